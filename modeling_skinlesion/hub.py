"""Package-only helper (not shipped as remote code): tell quickly whether a model id can be loaded here.

`huggingface_hub` retries an unreachable Hub for tens of seconds before failing deep inside `from_pretrained`; the
command-line tools check first and fail in seconds with one line that names the local alternative.
"""

from pathlib import Path

SHIPPED_CHECKPOINT = "checkpoints/skin-dualnet-small"


def check_model_source(source: str, local_alternative: str = SHIPPED_CHECKPOINT, timeout: float = 5.0) -> None:
    """Return if `source` is a local folder, a Hub id in the local cache, or a Hub id the Hub answers for within
    `timeout` seconds; else raise `ValueError` with one line saying so and naming `local_alternative`."""
    path = Path(source)
    if path.is_dir():
        return
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"{source!r} is not a model folder (nor a Hub id `owner/name`); try {local_alternative}.")
    from huggingface_hub import model_info, snapshot_download

    try:
        snapshot_download(source, local_files_only=True)
        return  # cached: loads offline
    except Exception:  # not in the cache: ask the Hub
        pass
    try:
        model_info(source, timeout=timeout)
    except Exception as error:  # offline mode, no network, unknown or private repo: all end the same way
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"Cannot load {source!r} from the Hugging Face Hub ({type(error).__name__}: {reason[:160]}). "
            "Hub ids such as org/skin-dualnet stand for published repos; offline, use the local folder "
            f"{local_alternative} (the shipped checkpoint) or outputs/demo-model (from `bash scripts/run.sh demo "
            "--train-demo`)."
        ) from None


__all__ = ["SHIPPED_CHECKPOINT", "check_model_source"]
