"""Exports on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` fetched into the library's own
cache (offline once cached), and an export folder pushed with the user's own login.

``huggingface_hub`` is an optional extra (requirements-extras.txt); every failure is one UserError.
Only ``checkpoints.resolve_location`` fetches, so every phase, export.py and demo.py share it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from errors import UserError

PREFIX = 'hf://'
EXPORT_FILES = ['config.json', '*.safetensors']   # what inference reads: never the card or samples
ONNX_FILES = ['*.onnx', '*.onnx.data']
OWNER_NAME = re.compile(r'^[^/]+/[^/]+$')   # the shape; the Hub's own rules are huggingface_hub's validator
LOGIN_HINT = 'log in with `hf auth login` (or set HF_TOKEN)'


def is_hub_uri(path: object) -> bool:
    """True for ``hf://...`` strings (a Path would already have lost one slash of the prefix)."""
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(uri: str) -> tuple[str, str | None]:
    """``hf://OWNER/NAME[@REVISION]`` -> (repo id, revision or None); a name the Hub would reject is a
    UserError here (needs huggingface_hub, as fetching does)."""
    repo_id, at, revision = uri.removeprefix(PREFIX).partition('@')
    if not OWNER_NAME.match(repo_id) or (at and not revision):
        raise UserError(f'{uri}: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION')
    check_repo_id(repo_id, uri)
    return repo_id, revision or None


def check_repo_id(repo_id: str, what: str) -> None:
    """A UserError naming ``what`` unless ``repo_id`` is OWNER/NAME and passes the Hub library's own rules
    (characters, ``--``/``..``, length ≤ 96), so a bad name fails before anything is written or uploaded."""
    if not OWNER_NAME.match(repo_id):
        raise UserError(f'{what}: expected OWNER/NAME')
    _library()
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f'{what}: not a valid Hugging Face Hub repository id: {_first_line(exc)}') from None


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (the library reads it once, at import)."""
    return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')


def _library():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError('hf:// checkpoints and --push_to_hub need huggingface_hub: pip install -r '
                              'requirements-extras.txt') from None
    return huggingface_hub


def fetch(uri: str, onnx: bool = False) -> Path:
    """The local folder (in the Hub cache) holding the export's config.json and safetensors (and its
    ONNX graphs with ``onnx``); downloads only what is missing or changed."""
    repo_id, revision = parse(uri)
    hf = _library()
    from huggingface_hub import errors
    patterns = EXPORT_FILES + (ONNX_FILES if onnx else [])
    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                         local_files_only=offline()))
    except errors.RevisionNotFoundError:
        raise UserError(f'{uri}: the repository has no revision {revision!r}') from None
    except errors.RepositoryNotFoundError:   # also gated/private repositories without access
        raise UserError(f'{uri}: no such model repository on the Hugging Face Hub (a private one needs '
                              f'access: {LOGIN_HINT})') from None
    except errors.LocalEntryNotFoundError:
        if offline():
            raise UserError(f'{uri} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: '
                                  f'fetch it once online') from None
        raise UserError(f'{uri}: cannot reach the Hugging Face Hub (no network?) and it is not in the '
                              f'local cache') from None
    except (errors.HFValidationError, errors.HfHubHTTPError) as exc:
        raise UserError(f'{uri}: {_first_line(exc)}') from None


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the model repository and upload the folder with the user's login; its URL on the
    endpoint the library is configured for (HF_ENDPOINT: a private mirror prints its own address)."""
    check_repo_id(repo_id, f'--push_to_hub {repo_id}')
    hf = _library()
    from huggingface_hub import constants, errors  # constants: a submodule, not loaded by the package
    api = hf.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message='Upload U-GAT-IT export')
    except errors.LocalTokenNotFoundError:
        raise UserError(f'cannot push to {repo_id}: not logged in; {LOGIN_HINT}') from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, 'response', None), 'status_code', None)
        hint = f' ({LOGIN_HINT} with a token that may write there)' if status in (401, 403) else ''
        raise UserError(f'cannot push to {repo_id}: {_first_line(exc)}{hint}') from None
    except Exception as exc:
        if not _network_error(exc):
            raise
        raise UserError(f'cannot push to {repo_id}: cannot reach the Hugging Face Hub (no network?)') from None
    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def _network_error(exc: Exception) -> bool:
    """Connection failures surface as OSError or httpx's errors, whose class we need not import."""
    return isinstance(exc, OSError) or type(exc).__module__.split('.')[0] in ('httpx', 'httpcore', 'requests')


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
