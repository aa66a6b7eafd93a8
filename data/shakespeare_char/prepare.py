"""
tinyshakespeare at the character level: uses input.txt beside this file when present, else downloads it.
    python data/shakespeare_char/prepare.py [--input=ANY_UTF8_TEXT_FILE]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for char_dataset
from char_dataset import TINYSHAKESPEARE, read_text, write_char_dataset

here = os.path.dirname(os.path.abspath(__file__))
write_char_dataset(read_text(here, TINYSHAKESPEARE, sys.argv[1:]), here)
