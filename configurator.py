"""
Every script's command line: config in, one-line errors out. Config comes from Python files and --key=value flags,
applied in command-line order, so later wins:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file runs in a fresh namespace, and every plain value it assigns to a public name must be a known
key; a file may compute with helpers, since modules, functions, classes (anything callable) and names that
start with an underscore are not keys. Anything that goes wrong in a file, even sys.exit(), is one error
line that names the file and the line. A flag's value is a Python literal; a bare word such as --device=cuda
is a string, and so is any text given to a string key. A value must have its default's type (an int is fine
where a float is expected); a key whose default is None takes any literal.
"""
import ast
import difflib
import math
import os
import re
import sys
import types


class ConfigError(Exception):
    """Bad input. The scripts print it as one line on stderr and exit with code 2 (stops.run_main), having
    written nothing."""


def check_ranges(cfg, positive=(), not_negative=(), below_one=()):
    """Refuse, in one line, the first key outside its range: > 0, >= 0, or in [0, 1)."""
    for keys, wrong, what in ((positive, lambda v: v <= 0, "be positive"),
                              (not_negative, lambda v: v < 0, "not be negative"),
                              (below_one, lambda v: not 0.0 <= v < 1.0, "be in [0, 1)")):
        for key in keys:
            if wrong(cfg[key]):
                raise ConfigError(f"{key} must {what}, got {cfg[key]}")


def parse(spec, argv):
    """spec: (key, default, comment) triples. Returns the resolved config, and the set of keys a file or flag set."""
    defaults = {key: default for key, default, _ in spec}
    if "--help" in argv or "-h" in argv:
        script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "the script"
        print(f"usage: python {script} [config.py ...] [--key=value ...]   (applied in order: later wins)\n"
              + help_text(spec))
        sys.exit(0)
    config = dict(defaults)
    given = set()  # the keys a file or a flag set
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: flags take the form --key=value")
            where = f"--{key}"
            check_key(key, defaults, where)
            value = parse_value(text, where, defaults[key])
            config[key] = check_type(key, value, defaults[key], where)
            given.add(key)
        else:
            for key, value in run_config_file(arg).items():
                check_key(key, defaults, f"config file {arg}")
                config[key] = check_type(key, value, defaults[key], f"config file {arg}")
                given.add(key)
    return config, given


def help_text(spec):
    width = max(len(f"--{key}={default!r}") for key, default, _ in spec)
    return "\n".join(f"  {f'--{key}={default!r}':<{width}}  {comment}" for key, default, comment in spec)


def run_config_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror.lower()}") from None
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"config file {path}, line {line}: not UTF-8 text "
                          f"(byte {data[e.start]:#04x}: {e.reason})") from None
    namespace = {"__file__": path}
    try:
        exec(compile(source, path, "exec"), namespace)
    # BaseException too: a file's sys.exit() or raise KeyboardInterrupt is its error, not a way to end the script
    except BaseException as e:
        # only a SyntaxError in the file itself has the file's line; one from code the file compiles has another's
        line = e.lineno if isinstance(e, SyntaxError) and e.filename == path else _traceback_line(e, path)
        text = " ".join(str(e).splitlines())  # the message may span lines; the error is one line
        # sys.exit() and KeyboardInterrupt have no text
        what = f"{type(e).__name__}: {text}" if text else type(e).__name__
        raise ConfigError(f"config file {path}, line {line}: {what}") from None
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType) and not callable(value)}


def _traceback_line(e, path):
    tb = e.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


# a bare word is a path-like or name-like string: out-gpt2, cuda:0, /data/owt, bfloat16
BARE_WORD = re.compile(r"[A-Za-z_./~][\w./~:+-]*")


def parse_value(text, where, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if BARE_WORD.fullmatch(text) or isinstance(default, str):
            return text
        raise ConfigError(f"{where}: cannot parse {text!r} as a Python literal") from None
    # a string key takes its text as written: --start=1234 is the prompt "1234"
    return text if isinstance(default, str) and not isinstance(value, str) else value


def check_type(key, value, default, where):
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not (abs(value) < 1e308 and math.isfinite(value)):  # a nan learning rate trains to nan
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        value = float(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        kinds = {bool: "True or False", int: "an int", float: "a number", str: "a string"}
        kind = kinds.get(type(default), type(default).__name__)
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r} ({type(value).__name__})")
    return value
