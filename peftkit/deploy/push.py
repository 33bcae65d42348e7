"""`peftkit push`: upload a run's adapter folder (or a merged model folder) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import UserError
from peftkit.run_folder import ADAPTER_DIR, MODEL_CARD


def push_folder(run_or_folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repository if needed and upload the folder; returns the repository URL.

    A run folder uploads its `adapter/` (weights, config, tokenizer, model card); any other folder (e.g. the output
    of `peftkit merge`) is uploaded as it is, so it must hold a model card and weights already.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    path = Path(run_or_folder)
    folder = path / ADAPTER_DIR if (path / ADAPTER_DIR).is_dir() else path
    if not (folder / MODEL_CARD).is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(
            f"`{path}` is neither a finished run folder nor a model folder with safetensors weights and a README.md; "
            "give a run folder written by `peftkit train` or a folder written by `peftkit merge`"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {folder.name} with peftkit")
    except OfflineModeIsEnabled:
        raise UserError("cannot push: HF_HUB_OFFLINE is set; unset it on a machine with network access") from None
    except HfHubHTTPError as exc:
        raise UserError(f"the Hub refused the upload to `{repo_id}`: {str(exc).splitlines()[0]} (log in with "
                        "`hf auth login` or pass --token / set HF_TOKEN with write access)") from None
    except OSError as exc:  # no route to the Hub: connection refused, DNS, timeouts
        raise UserError(f"cannot reach the Hugging Face Hub to push `{repo_id}`: {exc}") from None
    return str(url)
