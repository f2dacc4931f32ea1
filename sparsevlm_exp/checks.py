"""Checks made before anything is built or loaded: the top-level keys, the model keys,
the checkpoint's reachability, the config's interpolations, and which parts work
together. Each failure is one ConfigError line naming the key, the value and what is
allowed (errors.bad_value); the runner calls these first (issue 16: every bad value
refused before the weights load, exit 2).
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from .errors import ConfigError, bad_value
from .models.loading import DTYPES
from .policies import AdaptivePolicy

DEVICES = "auto, cpu, cuda, cuda:N or mps"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# An int keep below this share of a sample's visual tokens is almost surely a
# fraction written as an int (keep=1 means ONE token; keep=1.0 means all of them).
SMALL_INT_KEEP_SHARE = 0.02


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_top_level(cfg: DictConfig) -> None:
    """The top-level keys and the model keys, checked before anything is built."""
    if not is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise bad_value("batch_size", cfg.batch_size, "an int >= 1 (requests of a batch keep their own "
                        "token counts; see batching.py)")
    if cfg.limit is not None and (not is_int(cfg.limit) or cfg.limit < 1):
        raise bad_value("limit", cfg.limit, "null or an int >= 1")
    if not is_int(cfg.seed):
        raise bad_value("seed", cfg.seed, "an int")
    if not isinstance(cfg.resume, bool):
        raise bad_value("resume", cfg.resume, "true or false")
    if cfg.threads is not None and (not is_int(cfg.threads) or cfg.threads < 1):
        raise bad_value("threads", cfg.threads, "null (torch's default) or an int >= 1")
    if not is_int(cfg.viz.n) or cfg.viz.n < 0:
        raise bad_value("viz.n", cfg.viz.n, "an int >= 0 (pictures for the first n samples)")
    check_device(cfg.device)
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise bad_value("dtype", cfg.dtype, f"one of auto, {', '.join(DTYPES)}")
    check_model_keys(cfg.model)


def check_device(device) -> None:
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise bad_value("device", device, DEVICES)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise bad_value("device", device, "auto or cpu: no CUDA device is visible")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise bad_value("device", device, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_model_keys(m: DictConfig) -> None:
    attn = m.get("attn_implementation", "sdpa")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise bad_value("model.attn_implementation", attn, ", ".join(ATTN_IMPLEMENTATIONS))
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise bad_value("model.attn_implementation", attn, "sdpa or eager: the flash-attn package is not installed")
    if m.get("random_init") and m.get("processor") is None:
        raise bad_value("model.random_init", True, "false in the main app: a random-init model has no processor "
                        "to encode real samples (it is meant for `python -m sparsevlm_exp.bench`); "
                        "or set model.processor to a checkpoint with processor files")
    pretrained = m.get("pretrained")
    if not m.get("random_init") and isinstance(pretrained, str) and not pretrained.startswith("asset:"):
        check_checkpoint(pretrained)


def check_checkpoint(pretrained: str) -> None:
    """A local dir must hold config.json; a hub id that is not cached needs the network,
    which is checked with one quick connection instead of 30 s of download retries."""
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise bad_value("model.pretrained", pretrained, "a checkpoint directory holding config.json "
                            "(and the weights), or a hub id")
        return
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1:
        return                        # not a hub id: loading.py names it and the fix
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
            return                    # cached: works offline
    except Exception:                 # noqa: BLE001 - a malformed id: loading.py reports it
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable():
        raise bad_value("model.pretrained", pretrained, "a local checkpoint dir: the hub is not reachable and "
                        "this id is not in the local cache (download it elsewhere and set "
                        "model.pretrained=/path/to/dir)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_policy_reads_raters(policy, scorer) -> None:
    """A policy that reads the raters' attention (SparseVLM v1's rank rule) needs a
    scorer that asks for the instruction's rows: checked on a probe request of 4
    identical instruction tokens, where a rater scorer asks for all of them (FastV asks
    for the last token only, score-free baselines for none)."""
    if not getattr(policy, "needs_instruction_rows", isinstance(policy, AdaptivePolicy)):
        return
    embeds = torch.ones(1, 8, 4)
    visual, text = torch.arange(1, 4)[None], torch.arange(4, 8)[None]
    rows = scorer.query_rows(embeds, visual, text)
    if rows.shape[1] != text.shape[1] or not torch.equal(rows.sort(dim=1).values, text):
        raise bad_value("scorer", type(scorer).__name__, "a scorer that reads the instruction tokens' attention "
                        "(v15 or v2) with policy=adaptive, which reads the rank of that attention")


def resolve_or_explain(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict; an interpolation that names a missing key
    (`+experiment=paper_table1 row=nope`) becomes one line naming what exists there."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as err:
        missing = re.search(r"Interpolation key '([^']+)' not found", str(err))
        key = getattr(err, "full_key", None) or "?"
        if missing:
            parts = missing.group(1).split(".")
            for cut in range(len(parts) - 1, 0, -1):
                parent = OmegaConf.select(cfg, ".".join(parts[:cut]), throw_on_missing=False)
                if isinstance(parent, DictConfig):
                    name, allowed = parts[cut], ", ".join(map(str, parent.keys()))
                    # the top-level key whose value picked the missing entry (`row=nope`)
                    raw = OmegaConf.to_container(cfg, resolve=False)
                    chooser = next((k for k, v in raw.items() if v == name), None)
                    if chooser is not None:
                        raise bad_value(str(chooser), name, f"one of {allowed} (the keys of "
                                        f"{'.'.join(parts[:cut])})") from None
                    raise ConfigError(f"{key}: names {'.'.join(parts[:cut + 1])}, which does not exist: "
                                      f"one of {allowed}") from None
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'config'}: {str(err).splitlines()[0]}") from None
