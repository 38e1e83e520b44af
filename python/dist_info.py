#!/usr/bin/env python3
"""Writes ringxfer's .dist-info directory (what importlib.metadata and pip read).

    dist_info.py DIR VERSION ENTRY_POINTS            into DIR (the build tree)
    dist_info.py --install SITE VERSION ENTRY_POINTS   meson install script:
        into $DESTDIR/SITE, with a RECORD of the installed package's files
"""
import os
import sys

METADATA = """\
Metadata-Version: 2.1
Name: ringxfer
Version: {version}
Summary: Large framed messages over io_uring for asyncio: pooled, registered buffers, no copies
License: MIT
Requires-Python: >=3.9
Platform: Linux
"""


def write(site, version, entry_points, record):
    info = os.path.join(site, f"ringxfer-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    # Old versions' metadata would make two distributions of one package.
    for name in os.listdir(site):
        if name.startswith("ringxfer-") and name.endswith(".dist-info") and \
                os.path.join(site, name) != info:
            old = os.path.join(site, name)
            for f in os.listdir(old):
                os.unlink(os.path.join(old, f))
            os.rmdir(old)
    files = {
        "METADATA": METADATA.format(version=version),
        "entry_points.txt": open(entry_points).read(),
        "INSTALLER": "meson\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
    if record:
        rows = []
        for top in ("ringxfer", os.path.basename(info)):
            for root, _, names in os.walk(os.path.join(site, top)):
                for n in sorted(names):
                    rows.append(os.path.relpath(os.path.join(root, n), site) + ",,")
        rows.append(os.path.join(os.path.basename(info), "RECORD") + ",,")
        with open(os.path.join(info, "RECORD"), "w") as f:
            f.write("\n".join(sorted(set(rows))) + "\n")


def main(argv):
    install = argv[:1] == ["--install"]
    if install:
        argv = argv[1:]
    if len(argv) != 3:
        sys.exit(__doc__)
    site, version, entry_points = argv
    if install:
        destdir = os.environ.get("DESTDIR", "")
        if destdir:
            site = os.path.join(destdir, site.lstrip("/"))
    write(site, version, entry_points, record=install)


if __name__ == "__main__":
    main(sys.argv[1:])
