"""Reading a checkpoint folder: config.json, the safetensors files and the name -> file index."""

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from safetensors import safe_open

from moe_engine.errors import MoeEngineError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype name, e.g. "BF16", "F8_E4M3"


def read_text(path: Path) -> str:
    """A side file's text; an unreadable one says why (permission denied), not that it is damaged."""
    try:
        return path.read_text()
    except PermissionError:
        raise MoeEngineError(f"cannot read {path}: permission denied; make it readable (chmod a+r) or run "
                             "as a user who may read it") from None
    except UnicodeDecodeError as e:
        raise MoeEngineError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-download it") from None
    except OSError as e:
        raise MoeEngineError(f"cannot read {path}: {e.strerror or e}; check the file") from None


def read_config(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise MoeEngineError(f"model folder {str(path)!r} does not exist; pass a folder holding config.json "
                             "and *.safetensors (e.g. weights/tiny-mixtral)")
    if not path.is_dir():
        raise MoeEngineError(f"{str(path)!r} is a file, not a model folder; pass the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        inside = sorted(str(p.parent) for p in path.glob("*/config.json"))
        hint = f"; models inside it: {', '.join(inside[:5])}" if inside else ""
        raise MoeEngineError(f"{str(path)!r} is not a model folder: it has no config.json; pass a Hugging "
                             f"Face-format folder (config.json + *.safetensors){hint}")
    text = read_text(cfg_path)
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoeEngineError(f"{cfg_path} is not valid JSON ({e}); re-download the model's config.json") from None
    if not isinstance(cfg, dict):
        raise MoeEngineError(f"{cfg_path} should hold a JSON object; re-download the model's config.json")
    return path, cfg


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files; pickle checkpoints are refused, never opened."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        text = read_text(index)
        try:
            weight_map = json.loads(text)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoeEngineError(f"{index} is not a valid safetensors index ({e!r}); re-download it") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MoeEngineError(f"{index} is not a valid safetensors index (weight_map must map tensor names "
                                 "to file names); re-download it")
        files = sorted({path / _shard_name(index, f) for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MoeEngineError(f"shard(s) {', '.join(absent)} named in {index.name} are missing from {path}; "
                                 "finish the download")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MoeEngineError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}); safetensors is "
                             "required (pickle files can run code and are never loaded): download the "
                             "model's *.safetensors files")
    raise MoeEngineError(f"{path} has no *.safetensors weights; download the model's safetensors files")


def _shard_name(index: Path, name: str) -> str:
    """A file name from the index, which must name a .safetensors file inside the model folder: relative,
    without `..` (checked on the name, not its target: a symlinked file, as in the Hugging Face cache, is fine)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or ".." in parts or "\0" in name):
        raise MoeEngineError(f"{index.name} names the file {name!r}, outside the model folder {index.parent}; "
                             "shards must be files inside it: re-download the index")
    if not name.endswith(".safetensors"):
        raise MoeEngineError(f"{index.name} names the file {name!r}, which is not a .safetensors file; "
                             "safetensors is required: re-download the model's *.safetensors files and index")
    return name


def index_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> file, shape and dtype for every tensor, read from the headers only (nothing is loaded)."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except PermissionError:
            raise MoeEngineError(f"cannot read {f}: permission denied; make it readable (chmod a+r) or run as a "
                                 "user who may read it") from None
        except OSError as e:
            raise MoeEngineError(f"cannot read {f}: {e.strerror or e}; check the file") from None
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    out[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises several types for damaged files
            raise MoeEngineError(f"cannot read {f}: truncated or not a safetensors file ({type(e).__name__}); "
                                 "re-download that file") from None
        check_complete(f, out)
    return out


def check_complete(f: Path, tensors: dict[str, TensorInfo]) -> None:
    """A file cut short still has a readable header; its data end must lie within the file."""
    with open(f, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > f.stat().st_size:
        raise MoeEngineError(f"{f} is truncated ({f.stat().st_size} bytes, header promises "
                             f"{8 + header_len + data_end}); re-download that file")
