"""The Python examples of docs/python.md and README.md, run as a reader runs them.

The code block is taken from the document as it is (only its port is
replaced by a free one, so parallel runs cannot collide): a server process
and a client process, the client printing "N MB/s". The figure itself is a
benchmark's business (bench/compare's py-ringxfer rows); this checks that
the example runs, moves every frame, and prints what the document says.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import free_port

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "python.md")


def _example():
    text = open(DOC, encoding="utf-8").read()
    start = text.index("## The seed's echo benchmark")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, "docs/python.md lost its echo example"
    return block.group(1)


def test_echo_example_runs_as_documented(tmp_path):
    code = _example()
    assert len(code.strip().splitlines()) <= 25, "the example is meant to stay short"
    port = free_port()
    code, n = re.subn(r"^port = \d+$", f"port = {port}", code, flags=re.M)
    assert n == 1, "the example's 'port = NNNN' line moved: update this test"
    script = tmp_path / "echo.py"
    script.write_text(code)
    env = dict(os.environ)
    server = subprocess.Popen([sys.executable, str(script), "serve"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = None
        for _ in range(100):  # the server needs a moment to listen
            client = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                                    text=True, timeout=120)
            if "ConnectionRefusedError" not in client.stderr:
                out = client
                break
            import time
            time.sleep(0.1)
        assert out is not None, "the example's server never listened"
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(r"\d+ MB/s\n", out.stdout), out.stdout
        assert server.poll() is None, "the server died: " + server.stdout.read()
    finally:
        server.kill()
        server.wait()


def test_readme_example_prints_what_it_sent():
    readme = os.path.join(os.path.dirname(DOC), "..", "README.md")
    text = open(readme, encoding="utf-8").read()
    start = text.index("## Using it from Python")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, "README.md lost its Python example"
    out = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "b'hello, world'\n"


def test_dask_example_runs_a_cluster_over_ringxfer(tmp_path):
    pytest.importorskip("distributed")
    doc = os.path.join(os.path.dirname(DOC), "dask.md")
    text = open(doc, encoding="utf-8").read()
    start = text.index("One host, everything from Python")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, "docs/dask.md lost its LocalCluster example"
    script = tmp_path / "cluster.py"
    script.write_text(block.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    address, total = out.stdout.splitlines()
    assert re.fullmatch(r"ringxfer://127\.0\.0\.1:\d+", address), address
    # The same sum computed without Dask's scheduler or any comm.
    import dask.array as da
    x = da.random.RandomState(0).random_sample((2000, 2000), chunks=(500, 500))
    assert int(total) == round(float((x @ x.T).sum().compute(scheduler="sync")))
