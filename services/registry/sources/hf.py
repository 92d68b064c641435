"""hf://ORG/NAME[@REVISION][/SUBFOLDER]: a Hugging Face Hub model repo, through huggingface_hub.

Downloads only adapter_config.json and adapter_model.safetensors. With a tenant's credentials (the
auth file's "tenants"), its hf_token (none: anonymous) and hf_endpoint; without (admins, open
registries, on-demand imports) HF_ENDPOINT and HF_TOKEN, read at call time.
"""

from __future__ import annotations

import os
import pathlib
import re

from services.common.errors import InvalidAdapter, InvalidArgument, NotFound, Unavailable
from services.common.hub import endpoint_of, import_hub, unreachable
from services.common.peft_format import ADAPTER_FILES, CONFIG_FILE, PICKLE_FILES, PICKLE_MESSAGE

_URI = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?")


def parse_hf_uri(uri: str) -> tuple[str, str | None, str | None]:
    """-> (repo_id, revision or None, subfolder or None)."""
    m = _URI.fullmatch(uri)
    if m is None or (m["sub"] and ".." in m["sub"].split("/")):
        raise InvalidArgument(f"{uri!r} is not hf://ORG/NAME[@REVISION][/SUBFOLDER]")
    return m["repo"], m["rev"], (m["sub"].strip("/") or None) if m["sub"] else None


class HfSource:
    def fetch(self, uri: str, workdir: pathlib.Path, credentials=None) -> dict[str, pathlib.Path]:
        huggingface_hub = import_hub()
        from huggingface_hub import errors as hf_errors

        repo, revision, subfolder = parse_hf_uri(uri)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        if credentials is None:
            token = os.environ.get("HF_TOKEN") or None
        else:                          # a tenant's token, or none at all (False: not even a saved one)
            endpoint = credentials.hf_endpoint or endpoint
            token = credentials.hf_token or False
        # at once, not after huggingface_hub's five retries (~25 s) on a machine without network
        why = unreachable(endpoint)
        if why is not None:
            raise Unavailable(f"{uri}: cannot reach the Hugging Face Hub ({endpoint_of(endpoint)}): "
                              f"{why}")
        out: dict[str, pathlib.Path] = {}
        for name in ADAPTER_FILES:
            try:
                path = huggingface_hub.hf_hub_download(
                    repo, name, subfolder=subfolder, revision=revision, endpoint=endpoint,
                    token=token, local_dir=workdir)
            except hf_errors.RepositoryNotFoundError:
                raise NotFound(f"{uri}: Hugging Face repo {repo!r} not found (or private: the "
                               "registering tenant's hf_token in the auth file, or HF_TOKEN on the "
                               "registry for admins)") from None
            except hf_errors.RevisionNotFoundError:
                raise NotFound(f"{uri}: revision {revision!r} not found in {repo!r}") from None
            except hf_errors.LocalEntryNotFoundError as exc:
                raise Unavailable(f"{uri}: cannot reach the Hugging Face Hub "
                                  f"({endpoint or 'default endpoint'}): {exc}") from None
            except hf_errors.EntryNotFoundError:
                if name != CONFIG_FILE and self._has_pickle(repo, revision, subfolder, endpoint,
                                                            token):
                    raise InvalidAdapter(PICKLE_MESSAGE.format(name="adapter_model.bin")) from None
                raise InvalidArgument(f"{uri}: no {name} in {repo!r}"
                                      f"{' under ' + subfolder if subfolder else ''}; a PEFT LoRA "
                                      f"adapter holds {' and '.join(ADAPTER_FILES)}") from None
            except hf_errors.HfHubHTTPError as exc:
                raise Unavailable(f"{uri}: Hugging Face Hub error: {exc}") from None
            except (OSError, ValueError) as exc:
                raise Unavailable(f"{uri}: cannot download {name}: {type(exc).__name__}: {exc}") \
                    from None
            out[name] = pathlib.Path(path)
        return out

    @staticmethod
    def _has_pickle(repo, revision, subfolder, endpoint, token) -> bool:
        huggingface_hub = import_hub()
        name = PICKLE_FILES[0]
        url = huggingface_hub.hf_hub_url(repo, f"{subfolder}/{name}" if subfolder else name,
                                         revision=revision, endpoint=endpoint)
        try:
            huggingface_hub.get_hf_file_metadata(url, token=token, endpoint=endpoint)
            return True
        except Exception:
            return False
