"""Hugging Face PEFT's target_modules, in both directions.

Export turns our resolved module paths into PEFT config fields that select exactly those
modules. Import applies PEFT's matching rules (peft 0.21, ``check_target_module_exists``) to
our model's module paths. Both sides use the same dotted paths, such as
``model.layers.0.self_attn.q_proj``, because mlx-lm names llama-family modules as transformers
does.
"""

import re
from collections import defaultdict

import mlx.nn as nn

from mlxlora.attach import BLOCK_PATTERN, is_linear, list_candidates, natural_key

# The module list that contains the transformer blocks, as attach.BLOCK_PATTERN finds it.
LAYERS_PATTERN = "layers"


def split_block_path(path: str) -> tuple[str, int, str] | None:
    """Split model.layers.3.self_attn.q_proj into ("model.layers", 3, "self_attn.q_proj")."""
    match = BLOCK_PATTERN.search(path)
    if match is None:
        return None
    prefix = path[:match.start(1) - 1]
    return prefix, int(match.group(1)), path[match.end():]


def target_fields(paths: list[str], layers: int | None) -> dict:
    """Return target_modules, layers_to_transform and layers_pattern that select exactly ``paths``.

    When every block in a run of blocks from 0 has the same adapted modules and no block limit
    was set, the leaf names alone suffice (["q_proj", "v_proj"]), as in most PEFT configs.
    When the same modules sit in another set of blocks, layers_to_transform lists the blocks.
    Any other set becomes one regex that PEFT full-matches against module paths.
    """
    product = block_product(paths)
    if product is None:
        return {"target_modules": exact_regex(paths), "layers_to_transform": None,
                "layers_pattern": None}

    blocks, leaves = product
    # NOTE: without the model at hand, "blocks 0..K-1 and no block limit" is taken to mean all
    # blocks. An adapter whose explicit paths or regex picked only the first K blocks of a
    # deeper model exports a config that also matches later blocks. Those modules have no
    # tensors, so PEFT warns and leaves them without effect because lora_B starts at zero.
    if layers is None and blocks == list(range(len(blocks))):
        return {"target_modules": leaves, "layers_to_transform": None, "layers_pattern": None}
    return {"target_modules": leaves, "layers_to_transform": blocks,
            "layers_pattern": LAYERS_PATTERN}


def block_product(paths: list[str]) -> tuple[list[int], list[str]] | None:
    """Return (blocks, leaf names) when ``paths`` are the same modules in each of some blocks.

    Return None when a path lies outside the blocks, when blocks differ in their modules, or
    when two adapted modules of a block share a leaf name, because then leaf names are ambiguous.
    """
    parts = [split_block_path(path) for path in paths]
    if not parts or any(part is None for part in parts):
        return None

    prefixes = {prefix for prefix, _, _ in parts}
    blocks = sorted({block for _, block, _ in parts})
    suffixes = sorted({suffix for _, _, suffix in parts})
    leaves = sorted({suffix.rpartition(".")[2] for suffix in suffixes})
    if len(prefixes) != 1 or len(leaves) != len(suffixes):
        return None
    if len(set(paths)) != len(blocks) * len(suffixes):
        return None
    return blocks, leaves


def exact_regex(paths: list[str]) -> str:
    """Return a regex whose full matches are exactly ``paths``.

    Paths are grouped so that the regex stays readable: modules adapted in the same blocks
    share one branch, such as model\\.layers\\.(?:2|3)\\.self_attn\\.(?:q_proj|v_proj).
    """
    blocks_by_module = defaultdict(set)
    literal_branches = []
    for path in sorted(set(paths), key=natural_key):
        parts = split_block_path(path)
        if parts is None:
            literal_branches.append(re.escape(path))
        else:
            prefix, block, suffix = parts
            blocks_by_module[(prefix, suffix)].add(block)

    suffixes_by_blocks = defaultdict(list)
    for (prefix, suffix), blocks in blocks_by_module.items():
        suffixes_by_blocks[(prefix, tuple(sorted(blocks)))].append(suffix)

    block_branches = []
    for (prefix, blocks), suffixes in suffixes_by_blocks.items():
        block_pattern = alternation([str(block) for block in blocks])
        suffix_pattern = alternation([re.escape(suffix) for suffix in suffixes])
        block_branches.append(rf"{re.escape(prefix)}\.{block_pattern}\.{suffix_pattern}")
    return "|".join(block_branches + literal_branches)


def alternation(options: list[str]) -> str:
    if len(options) == 1:
        return options[0]
    return "(?:" + "|".join(options) + ")"


def matches_entries(entries: str | list[str], path: str) -> bool:
    """Apply PEFT's rule: a string is a regex to full-match, a list contains names or path endings."""
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return path in entries or any(path.endswith("." + entry) for entry in entries)


def layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    """Return the block index PEFT reads from ``path`` for layers_to_transform."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
            if match is not None:
                break
    return int(match.group(1)) if match else None


def peft_selects(config: dict, path: str, output_layer: str | None) -> bool:
    """Return whether the PEFT ``config`` adapts the module at ``path``.

    ``output_layer`` is the path of the model's output projection, which PEFT's "all-linear"
    leaves out.
    """
    excluded = config.get("exclude_modules")
    if excluded and matches_entries(excluded, path):
        return False

    targets = config["target_modules"]
    if targets == "all-linear":
        return path != output_layer
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not matches_entries(targets, path):
        return False

    # layers_to_transform applies only to names matched by their ending, as in PEFT.
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    index = layer_index(path, config.get("layers_pattern"))
    if index is None:
        return False
    if isinstance(indexes, int):
        return index == indexes
    return index in indexes


def resolve_peft_targets(config: dict, model: nn.Module) -> tuple[list[str], list[str]]:
    """Return (linear module paths the config selects, other selected module paths).

    The second list contains embeddings and mixture-of-experts layers, which PEFT can adapt and
    mlxlora cannot.
    """
    output_layer = "lm_head" if "lm_head" in dict(model.named_modules()) else None
    linear, other = [], []
    for candidate in list_candidates(model):
        if not peft_selects(config, candidate.path, output_layer):
            continue
        if is_linear(candidate.module):
            linear.append(candidate.path)
        elif config["target_modules"] != "all-linear":
            other.append(candidate.path)
    return sorted(linear, key=natural_key), sorted(other, key=natural_key)
