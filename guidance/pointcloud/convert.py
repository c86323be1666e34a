"""Convert a released Point-E checkpoint into a converted folder (model.safetensors +
config.json) that :func:`guidance.pointcloud.pretrained.load_point_model` reads.

    python -m guidance.pointcloud.convert SRC OUT model=NAME [dtype=keep|fp32|fp16|bf16]

NAME: base40M-imagevec, base40M-uncond, base40M, base300M, base1B, upsample (the release's
names; the files are base_40m_imagevec.pt, base_40m_uncond.pt, base_40m.pt, base_300m.pt,
base_1b.pt, upsample_40m.pt at https://openaipublic.azureedge.net/main/point-e/), or a tiny
test size (tiny-uncond, tiny-imagevec, tiny-grid, tiny-upsample).

SRC is a plain state dict in point_e's naming, read with ``torch.load(weights_only=True)``
only (a pickle holding anything but tensors and containers is refused). Its sizes (kind,
width, layers, condition sizes) are checked against model= first: a checkpoint of another
model is a one-line error naming both. The attention heads cannot be read off the tensors,
which is why model= is required: the release fuses q, k, v per head ([q_h k_h v_h] for each
head h), and the rows are reordered to our [Q | K | V] with the preset's head count.

Nothing is dropped silently: keys that match no release name (unknown) and release keys this
model kind does not have (unexpected) are listed in the summary; a missing tensor fails the
conversion. Every mistake (missing or unreadable SRC, another model, OUT not writable) is
one line on stderr and exit code 2, and nothing is written.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import UserError
from guidance.pointcloud.pretrained import save_point_model
from guidance.pointcloud.transformer import (CHANNEL_BIASES, CHANNEL_SCALES, PRESETS,
                                             PointModelConfig, PointTransformer, preset)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_W = r"\.(weight|bias)$"
#: release key pattern -> our key (after re.sub), for every model kind
RENAMES: List[Tuple[str, str]] = [
    (r"^time_embed\.c_fc" + _W, r"time_mlp.fc_in.\1"),
    (r"^time_embed\.c_proj" + _W, r"time_mlp.fc_out.\1"),
    (r"^input_proj" + _W, r"point_in.\1"),
    (r"^output_proj" + _W, r"point_out.\1"),
    (r"^ln_pre" + _W, r"norm_in.\1"),
    (r"^ln_post" + _W, r"norm_out.\1"),
    (r"^backbone\.resblocks\.(\d+)\.ln_1" + _W, r"blocks.\1.norm_attn.\2"),
    (r"^backbone\.resblocks\.(\d+)\.attn\.c_qkv" + _W, r"blocks.\1.attn.qkv.\2"),
    (r"^backbone\.resblocks\.(\d+)\.attn\.c_proj" + _W, r"blocks.\1.attn.out.\2"),
    (r"^backbone\.resblocks\.(\d+)\.ln_2" + _W, r"blocks.\1.norm_mlp.\2"),
    (r"^backbone\.resblocks\.(\d+)\.mlp\.c_fc" + _W, r"blocks.\1.mlp.fc_in.\2"),
    (r"^backbone\.resblocks\.(\d+)\.mlp\.c_proj" + _W, r"blocks.\1.mlp.fc_out.\2"),
    (r"^clip_embed" + _W, r"cond_in.\1"),                 # image-vec: one Linear
    (r"^clip_embed\.0" + _W, r"cond_norm.\1"),            # grid: Sequential(LayerNorm,
    (r"^clip_embed\.1" + _W, r"cond_in.\1"),              #                  Linear)
    (r"^cond_point_proj" + _W, r"coarse_in.\1"),          # upsampler: coarse cloud
    (r"^channel_scales$", "coarse_scales"),
    (r"^channel_biases$", "coarse_biases"),
]
_QKV = re.compile(r"^blocks\.\d+\.attn\.qkv\.(weight|bias)$")


@dataclass
class ConversionReport:
    """What happened to every key of the checkpoint."""

    name: str = ""
    total: int = 0
    converted: int = 0
    unknown: List[str] = field(default_factory=list)      # matched no release name
    unexpected: List[str] = field(default_factory=list)   # a release name this kind lacks
    missing: List[str] = field(default_factory=list)      # our tensors nobody provided
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"checkpoint: {self.total} tensors; model {self.name}; "
                 f"{self.converted} tensors converted"]
        for title, keys in (("MISSING", self.missing), ("unexpected (not converted)",
                                                        self.unexpected),
                            ("unknown (not converted)", self.unknown)):
            if keys:
                lines.append(f"  {title}: {len(keys)}: {_short(keys)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _short(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# -- reading ---------------------------------------------------------------------------

def load_release_checkpoint(path) -> Dict[str, Tensor]:
    """A released ``.pt`` -> {key: tensor}, read with ``torch.load(weights_only=True)``
    (memory-mapped when possible). One-line UserError for a missing, unreadable or unsafe
    file, or one that is not a dict of tensors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"{path} holds Python objects besides tensors{what}; refusing to "
                            "unpickle it (torch.load weights_only=True); a released Point-E "
                            "checkpoint is a plain state dict") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({_load_error(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors; it is not a Point-E checkpoint")
    others = sorted(str(k) for k in data if k not in tensors)
    if others:
        print(f"note: {path.name}: non-tensor entries ignored: {_short(others)}",
              file=sys.stderr)
    return tensors


def _load_error(exc: BaseException) -> str:
    """The informative line of a torch.load error (the weights-only unpickler's own line
    comes after its generic preamble)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return (rest or (lines[i + 1] if i + 1 < len(lines) else line))[:200]
    return _one_line(exc)


# -- sizes -----------------------------------------------------------------------------

def release_sizes(sd: Dict[str, Tensor]) -> Dict[str, int]:
    """The sizes a release state dict shows: kind, width, layers and the condition sizes."""
    if "input_proj.weight" not in sd or not any(k.startswith("backbone.resblocks.") for k in sd):
        raise UserError("not a Point-E transformer checkpoint (no input_proj.weight / "
                        "backbone.resblocks.*)")
    width, channels = sd["input_proj.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.resblocks."))
    sizes = dict(width=int(width), layers=layers, channels=int(channels))
    if "cond_point_proj.weight" in sd:
        sizes["kind"] = "upsample"
    elif "clip_embed.1.weight" in sd:
        sizes["kind"] = "image-grid"
    elif "clip_embed.weight" in sd:
        sizes["kind"] = "image-vec"
        sizes["clip_dim"] = int(sd["clip_embed.weight"].shape[1])
    else:
        sizes["kind"] = "uncond"
    if "clip_embed.1.weight" in sd:
        sizes["grid_dim"] = int(sd["clip_embed.1.weight"].shape[1])
    return sizes


def _describe(sizes: Dict) -> str:
    return f"{sizes['kind']}, width {sizes['width']}, {sizes['layers']} layers"


def _matches(config: PointModelConfig, sizes: Dict) -> bool:
    return all(getattr(config, k) == v for k, v in sizes.items())


def check_model_choice(sd: Dict[str, Tensor], name: str, src="the checkpoint") -> None:
    """A one-line UserError when the checkpoint's sizes are not those of model ``name``."""
    config = preset(name)
    try:
        sizes = release_sizes(sd)
    except UserError as exc:
        raise UserError(f"{src} is {exc}") from None
    if _matches(config, sizes):
        return
    want = _describe(config.to_dict())
    found = [n for n, c in PRESETS.items() if _matches(c, sizes)]
    if found:
        raise UserError(f"{src} is a {found[0]} checkpoint ({_describe(sizes)}), not "
                        f"{name} ({want}); convert it with model={found[0]}")
    raise UserError(f"{src} ({_describe(sizes)}) is not a {name} checkpoint ({want}) nor one "
                    f"of {', '.join(PRESETS)}")


# -- the mapping -----------------------------------------------------------------------

def per_head_to_blocked(qkv: Tensor, heads: int) -> Tensor:
    """The release's fused qkv rows (weight [3W, W] or bias [3W]) -> our [Q | K | V] rows.

    The release reads its projection as [.., heads, 3 d] and splits each head's 3 d channels
    into q, k, v: row ``h*3d + j*d + c`` is part j (q, k, v) of head h, channel c. We want
    row ``j*W + h*d + c``: a [heads, 3, d] -> [3, heads, d] transpose of the row index."""
    rows = qkv.shape[0]
    d = rows // (3 * heads)
    return qkv.reshape(heads, 3, d, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)


def rename_release_key(key: str) -> Optional[str]:
    """Our name for a release key, or None when it is no known release name."""
    for pattern, repl in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def release_to_ours(sd: Dict[str, Tensor], config: PointModelConfig
                    ) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Release state dict -> our state dict (renamed, qkv rows reordered), with the report of
    unknown keys; missing / unexpected are filled in by :func:`convert_state_dict`."""
    report = ConversionReport(total=len(sd))
    ours: Dict[str, Tensor] = {}
    for key, value in sd.items():
        new = rename_release_key(key)
        if new is None:
            report.unknown.append(key)
            continue
        if _QKV.match(new):
            if value.shape[0] != 3 * config.width:
                raise UserError(f"{key} has shape {tuple(value.shape)}, expected "
                                f"[{3 * config.width}, ...] for width {config.width}")
            value = per_head_to_blocked(value, config.heads)
        ours[new] = value
    return ours, report


def convert_state_dict(sd: Dict[str, Tensor], name, dtype: Optional[torch.dtype] = None,
                       src="the checkpoint") -> Tuple[PointTransformer, ConversionReport]:
    """Release state dict -> (our model holding its tensors, report). ``name``: a preset
    name (checked against the checkpoint's sizes) or a PointModelConfig. Raises a one-line
    UserError for another model's checkpoint, mis-shaped or missing tensors."""
    if isinstance(name, str):
        check_model_choice(sd, name, src)
        config = preset(name)
    else:
        config, name = name, "custom"
    ours, report = release_to_ours(sd, config)
    report.name = name
    with torch.device("meta"):
        model = PointTransformer(config)
    expected = model.state_dict()
    for key in list(ours):
        if key not in expected:
            report.unexpected.append(_release_name(key, sd))
            del ours[key]
        elif ours[key].shape != expected[key].shape:
            raise UserError(f"{src}: {_release_name(key, sd)} has shape "
                            f"{tuple(ours[key].shape)}, model={name} expects "
                            f"{tuple(expected[key].shape)}")
    report.missing = [k for k in expected if k not in ours]
    if report.missing:
        raise UserError(f"{src}: {len(report.missing)} tensors of model={name} missing "
                        f"({_short(report.missing, 4)}); nothing written")
    if dtype is not None:
        ours = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    report.converted = len(ours)
    if config.kind == "upsample":
        for buf, std in (("coarse_scales", CHANNEL_SCALES), ("coarse_biases", CHANNEL_BIASES)):
            if not torch.allclose(getattr(model, buf).float(), torch.tensor(std), atol=1e-6):
                report.notes.append(f"{buf} {getattr(model, buf).tolist()} differ from the "
                                    f"released {list(std)} (kept as stored)")
    return model, report


def _release_name(ours_key: str, sd: Dict[str, Tensor]) -> str:
    for key in sd:
        if rename_release_key(key) == ours_key:
            return key
    return ours_key


# -- the command -----------------------------------------------------------------------

def _check_out(out: Path) -> None:
    """OUT must be a folder this process can create or write in (checked without creating
    anything, so a conversion that fails later leaves nothing behind)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give a new or existing folder "
                        "as OUT")
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output folder {out}: {base} is not a writable "
                        "folder")


def convert_file(src, out, model: str, dtype: Optional[torch.dtype] = None,
                 echo: bool = True) -> ConversionReport:
    """Convert the checkpoint ``src`` into the folder ``out`` (see the module docstring).
    A new OUT is written as a temporary folder beside it, then renamed into place; an
    existing OUT gets its two files replaced, config.json last."""
    src, out = Path(src), Path(out)
    if isinstance(model, str):
        preset(model)                                         # an unknown name fails first
    _check_out(out)
    sd = load_release_checkpoint(src)
    net, report = convert_state_dict(sd, model, dtype=dtype, src=src)
    st = src.stat()
    extra = {"source": {"path": str(src.resolve()), "size": st.st_size,
                        "mtime": st.st_mtime, "release_names": True}}
    name = model if isinstance(model, str) else None
    if out.is_dir():
        save_point_model(net, out, name=name, extra=extra)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            save_point_model(net, tmp, name=name, extra=extra)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    if echo:
        print(report.summary())
        print(f"wrote {out}")
    return report


def command():
    """The command's positionals SRC OUT and keys (engine.cli)."""
    from engine.cli import Command, Key

    return Command("python -m guidance.pointcloud.convert", __doc__, [
        Key("model", str, None, required=True, choices=tuple(PRESETS),
            help="which released model SRC is (its sizes are checked)"),
        Key("dtype", str, "keep", choices=("keep",) + tuple(DTYPES)),
    ], positional=["src", "out"])


def run(argv: List[str]) -> int:
    from engine.cli import Command

    if not argv or Command.wants_help(argv):
        print(__doc__.strip())
        return 0
    args = command().parse(argv)
    convert_file(args.src, args.out, args.model, dtype=DTYPES.get(args.dtype))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
