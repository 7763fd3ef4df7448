"""A real S3 API on loopback for the tests: moto's server, started by the test that needs it."""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from tests.conftest import free_port


@dataclass
class S3:
    """A running server: its endpoint, the environment that points the S3 clients at it, and a
    filesystem to put and read objects with."""

    endpoint: str
    env: dict[str, str]
    fs: pafs.S3FileSystem

    def bucket(self, name: str) -> str:
        self.fs.create_dir(name)
        return f"s3://{name}"

    def put(self, uri: str, data: bytes) -> str:
        with self.fs.open_output_stream(uri.removeprefix("s3://"), compression=None) as out:  # bytes as given
            out.write(data)
        return uri

    @contextlib.contextmanager
    def authenticating(self) -> Iterator[None]:
        """While inside, the server checks every request's credentials against its IAM users
        (none: the test keys are refused); moto's own switch, ``/moto-api/reset-auth``."""

        def switch(count: str) -> None:
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth",
                data=count.encode(),
                headers={"Content-Type": "text/plain"},  # a form body would be parsed away
                method="POST",
            )
            urllib.request.urlopen(request, timeout=10).close()

        switch("0")
        try:
            yield
        finally:
            switch("inf")

    def put_file(self, uri: str, path: str) -> str:
        with open(path, "rb") as f:
            return self.put(uri, f.read())


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 on 127.0.0.1, with the AWS variables of this process pointing at it while it runs
    (workers a test starts inherit them)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "vlmcurate-test",
        "AWS_SECRET_ACCESS_KEY": "vlmcurate-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
        yield S3(endpoint, env, fs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
