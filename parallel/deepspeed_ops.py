"""DeepSpeed's just-in-time compiled ops that parallel.engine: deepspeed uses, built once ahead of the first
run (`python -m parallel.deepspeed_ops`, which scripts/install runs): CPU Adam (the optimizer step when the
optimizer state is offloaded) and, on CPU, the shared-memory collectives DeepSpeed's communication layer
loads. Each takes about a minute the first time and is cached (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR: point it at a shared directory on a cluster so every node reuses one build)."""

from __future__ import annotations

import sys
import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def missing() -> list[str]:
    """The ops not built yet (their JIT cache has no compiled library)."""
    from deepspeed.accelerator import get_accelerator

    out = []
    for name in OPS:
        builder_cls = get_accelerator().get_op_builder(name)
        if builder_cls is None:
            continue
        builder = builder_cls()
        if builder.is_compatible(verbose=False) and not _cached(builder):
            out.append(name)
    return out


def _cached(builder) -> bool:
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    try:
        directory = Path(_get_build_directory(builder.name, verbose=False))
    except Exception:
        return False
    return any(directory.glob("*.so"))


def nvme_problem() -> str | None:
    """Why offloading to NVMe cannot work on this machine (DeepSpeed's async_io op needs libaio), or None."""
    import contextlib
    import io

    from deepspeed.accelerator import get_accelerator

    builder_cls = get_accelerator().get_op_builder("AsyncIOBuilder")
    if builder_cls is None:
        return f"DeepSpeed has no async I/O op for {get_accelerator().device_name()}; offload to cpu instead of nvme"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ok = builder_cls().is_compatible(verbose=False)
    if ok:
        return None
    return (
        "offloading to nvme needs DeepSpeed's async_io op, which needs libaio on the training nodes (apt install "
        "libaio-dev, or your cluster's libaio module); offload to cpu instead, or install it and rerun"
    )


def build(names=None, out=sys.stderr) -> None:
    """Compile each op not built yet (default: all of them), with a progress line each."""
    from deepspeed.accelerator import get_accelerator

    for name in missing() if names is None else names:
        builder_cls = get_accelerator().get_op_builder(name)
        if builder_cls is None or not builder_cls().is_compatible(verbose=False):
            continue
        started = time.time()
        print(f"hpcft: DeepSpeed op {builder_cls().name}: building once (about a minute) ...", file=out, flush=True)
        builder_cls().load(verbose=False)
        print(f"hpcft: DeepSpeed op {builder_cls().name}: ready ({time.time() - started:.0f} s)", file=out, flush=True)


if __name__ == "__main__":
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    build()
