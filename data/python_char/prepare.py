"""
The default corpus, which needs no network: the Python standard library's own top-level .py files, in
sorted order, up to about 2 MB of text. Character-level, like shakespeare_char. Another Python version
has another standard library, so the corpus differs between Pythons; it is the same for the same Python.
"""
import glob
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for char_dataset
from char_dataset import write_char_dataset

MAX_CHARS = 2_000_000

parts, size = [], 0
for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
        parts.append(f"# {os.path.basename(path)}\n{f.read()}\n")
    size += len(parts[-1])
    if size >= MAX_CHARS:
        break
write_char_dataset("".join(parts)[:MAX_CHARS], os.path.dirname(os.path.abspath(__file__)))
