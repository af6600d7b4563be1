"""A remote OUT (s3://, gs://): convert into a local staging folder, then upload it.

The staging folder's name comes from the URL, so a killed job re-run with the same command
finds its finished units there and resumes. Upload writes the index last (S6).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import xxhash

from streamshards.convert.errors import ConvertError
from streamshards.util import is_remote, local_path


class RemoteOutput:
    """Where convert writes (``.local``) and, for a URL, how it publishes there (``publish``)."""

    def __init__(self, out: str):
        self.out = out
        if is_remote(out):
            self._upload = _find_upload(out)
            name = xxhash.xxh3_64_hexdigest(out.encode("utf-8"))
            self.local = os.path.join(tempfile.gettempdir(), f"streamshards-convert-{name}")
        else:
            self.local = local_path(out)

    def publish(self, progress: bool = True) -> None:
        """Upload the finished local dataset to the URL, index last, then drop the local copy."""
        if not is_remote(self.out):
            return
        try:
            self._upload(self.local, self.out, progress=progress)
        except (OSError, ValueError) as err:
            raise ConvertError(
                f"converted into {self.local} but uploading to {self.out} failed: {err}; "
                "run the same command again to retry the upload"
            ) from None
        shutil.rmtree(self.local, ignore_errors=True)


def _find_upload(out: str):
    try:
        from streamshards.storage import open_storage
        from streamshards.transfer import upload
    except ImportError:
        raise ConvertError(
            f"OUT {out}: writing to a URL needs the storage layer (streamshards.transfer), "
            "which this installation lacks; convert into a local folder, then run "
            "streamshards upload"
        ) from None
    try:
        open_storage(out)
    except (ValueError, ImportError) as err:
        raise ConvertError(f"OUT: {err}") from None
    return upload
