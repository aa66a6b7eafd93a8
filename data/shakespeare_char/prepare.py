"""
tinyshakespeare at the character level: uses input.txt beside this file when present, else downloads it.
    python data/shakespeare_char/prepare.py [--input=ANY_UTF8_TEXT_FILE]
"""
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for char_dataset
from char_dataset import write_char_dataset

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
if args and not (len(args) == 1 and args[0].startswith("--input=")):
    sys.exit("usage: python prepare.py [--input=FILE]")
path = args[0][len("--input="):] if args else os.path.join(here, "input.txt")
if not os.path.exists(path):
    if args:
        sys.exit(f"error: --input file {path} does not exist")
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            text = r.read().decode("utf-8")
    except OSError as e:
        sys.exit(f"error: cannot download tinyshakespeare ({e}); put the text in {path} or pass --input=FILE")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
except (OSError, UnicodeDecodeError) as e:
    sys.exit(f"error: cannot read {path} as UTF-8 text: {e}")
write_char_dataset(text, here)
