"""
Bad input is one line, and writes nothing; the command line means what it says (configurator.py):
    python3 -m pytest -q -n 2 test_bad_input.py
- flags are Python literals or bare words; config files apply in command-line order, later wins, their helpers are
  not keys; --help lists every key with its default and comment;
- whatever goes wrong in a flag or a config file is one line naming it;
- a wrong flag, config file or combination, a non-finite number, another trainer's checkpoint, a prompt file that
  is not text, to train.py, sample.py or export.py: one line on stderr, exit 2, before anything is touched.
"""
import re

import pytest
import torch

import checkpoint
import configurator
import export
import sample
import train
from configurator import ConfigError
from conftest import TINY, files_and_mtimes, run, run_process, state_at


SPEC = [("batch_size", 12, "b"), ("learning_rate", 6e-4, "lr"), ("compile", True, "c"),
        ("device", "cuda", "d"), ("vocab_size", None, "v")]


def test_flags_parse_as_literals_and_bare_words():
    cfg, given = configurator.parse(SPEC, ["--batch_size=32", "--learning_rate=1", "--compile=False",
                                           "--device=cuda:1", "--vocab_size=[1, 2]"])
    assert cfg == {"batch_size": 32, "learning_rate": 1.0, "compile": False, "device": "cuda:1", "vocab_size": [1, 2]}
    assert isinstance(cfg["learning_rate"], float) and given == set(cfg)
    assert configurator.parse(SPEC, ["--device=1234"])[0]["device"] == "1234"  # a string key takes its text


@pytest.mark.parametrize("argv, message", [
    (["--bach_size=3"], "unknown config key 'bach_size' (did you mean batch_size?)"),
    (["--batch_size=3.5"], "batch_size must be an int, got 3.5 (float)"),
    (["--batch_size=True"], "batch_size must be an int, got True (bool)"),
    (["--compile=1"], "compile must be True or False, got 1 (int)"),
    (["--learning_rate=1e-3e"], "cannot parse '1e-3e' as a Python literal"),
    (["--batch_size"], "flags take the form --key=value"),
    (["no_such_file.py"], "config file no_such_file.py: no such file or directory"),
])
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        configurator.parse(SPEC, argv)


def test_config_files_apply_in_order_and_later_wins(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import math\n_helper = 3\nbatch_size = _helper * 2\nlearning_rate = math.pi\n")
    cfg, given = configurator.parse(SPEC, ["--batch_size=1", str(a)])
    assert cfg["batch_size"] == 6 and cfg["learning_rate"] == pytest.approx(3.14159, abs=1e-5)
    cfg, _ = configurator.parse(SPEC, [str(a), "--batch_size=1"])
    assert cfg["batch_size"] == 1
    assert given == {"batch_size", "learning_rate"}


def test_broken_config_files_are_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nbatch_sise = 5\n")
    unknown = r"config file .*bad.py: unknown config key 'batch_sise' \(did you mean batch_size\?\)"
    with pytest.raises(ConfigError, match=unknown):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("batch_size = (\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py, line 1: SyntaxError"):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("x = 1\n_y = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py, line 2: ZeroDivisionError"):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py: compile must be True or False"):
        configurator.parse(SPEC, [str(bad)])


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as done:  # what `python train.py --help` runs, in this process
        train.main(["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python ") and "[config.py ...] [--key=value ...]" in printed.splitlines()[0]
    for key, default, comment in train.CONFIG:
        assert f"--{key}={default!r}" in printed and comment in printed


@pytest.mark.parametrize("source, message", [
    (b"batch_size = 4\ndevice = '\xff'\n", "line 2: not UTF-8 text (byte 0xff: invalid start byte)"),
    (b"batch_size = 4\nimport sys; sys.exit(3)\n", "line 2: SystemExit: 3"),
    (b"import sys\nsys.exit()\n", "line 2: SystemExit"),
    (b"raise KeyboardInterrupt\n", "line 1: KeyboardInterrupt"),
    (b"raise ValueError('two\\nlines')\n", "line 1: ValueError: two lines"),
    (b"import json\n\njson.loads('[')\n", "line 3: JSONDecodeError: Expecting value: line 1 column 2 (char 1)"),
])
def test_whatever_goes_wrong_in_a_config_file_is_one_line_naming_it(tmp_path, source, message):
    path = tmp_path / "bad.py"
    path.write_bytes(source)
    with pytest.raises(ConfigError) as e:
        configurator.parse(SPEC, [str(path)])
    assert str(e.value) == f"config file {path}, {message}"


def test_a_folder_given_as_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}: is a directory")):
        configurator.parse(SPEC, [str(tmp_path)])


def test_config_file_helpers_are_not_keys(tmp_path):
    path = tmp_path / "helpers.py"
    path.write_text("import math\nfrom math import sqrt\nfrom collections import OrderedDict\n"
                    "def double(x):\n    return 2 * x\n"
                    "class Sizes:\n    small = 2\n"
                    "halve = lambda x: x / 2\n_private = 5\n"
                    "batch_size = double(Sizes.small) + _private\nlearning_rate = halve(sqrt(4))\n")
    cfg, given = configurator.parse(SPEC, [str(path)])
    assert cfg["batch_size"] == 9 and cfg["learning_rate"] == 1.0 and given == {"batch_size", "learning_rate"}


# --- every script --------------------------------------------------------------------------------------------------

def test_malformed_invocations_fail_before_anything_is_touched(tmp_path, dataset):
    """Each bad invocation: exit 2, one line on stderr naming the problem, no traceback, and out_dir untouched."""
    run(tmp_path / "run", dataset, "--max_iters=10", "--checkpoint_interval=5")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt_0000005.pt").write_bytes(b"not a checkpoint at all\n" * 50)
    (tmp_path / "a_file").write_text("")
    # files that are checkpoints in form only: another trainer's (verified, loadable), and weights alone
    for name, state in (("not_ours", {"state_dict": {"w": torch.zeros(2)}, "epoch": 5}),
                        ("weights", {k: v for k, v in state_at(tmp_path / "run", 5).items()
                                     if k in ("model", "model_args", "step", "meta")})):
        (tmp_path / name).mkdir()
        checkpoint.save(str(tmp_path / name), 5, state)
    not_ours, weights = tmp_path / "not_ours", tmp_path / "weights"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    configs = {"broken.py": "batch_size = (\n", "unknown.py": "batch_size = 4\nlearning_rat = 1e-3\n",
               "raises.py": "n_layer = 1 // 0\n", "nan.py": "learning_rate = float('nan')\n"}
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    data, ran, fresh = f"--dataset={dataset}", f"--out_dir={tmp_path / 'run'}", f"--out_dir={tmp_path / 'fresh'}"
    train_cases = [
        ([data, fresh, "--n_embd=30", "--n_head=4"], "n_embd=30 must be divisible by n_head=4"),
        ([data, fresh, "--bach_size=4"], "unknown config key 'bach_size' (did you mean batch_size?)"),
        ([data, fresh, "--batch_size=4.5"], "batch_size must be an int, got 4.5 (float)"),
        ([data, fresh, "--learning_rate=1e-3e"], "cannot parse '1e-3e' as a Python literal"),
        ([data, fresh, "--compile"], "--compile: flags take the form --key=value"),
        ([data, fresh, str(tmp_path / "missing.py")], "missing.py: no such file or directory"),
        ([data, fresh, str(tmp_path / "broken.py")], "broken.py, line 1: SyntaxError"),
        ([data, fresh, str(tmp_path / "unknown.py")], "unknown.py: unknown config key 'learning_rat'"),
        ([data, fresh, str(tmp_path / "raises.py")], "raises.py, line 1: ZeroDivisionError"),
        ([data, fresh, "--batch_size=0"], "batch_size must be positive, got 0"),
        ([data, fresh, "--batch_size=-4"], "batch_size must be positive, got -4"),
        ([data, fresh, "--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
        ([data, fresh, "--warmup_iters=50", "--lr_decay_iters=10"],
         "warmup_iters=50 must not exceed lr_decay_iters=10"),
        ([data, fresh, "--device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ([data, fresh, "--dtype=float8"], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
        ([data, fresh, "--from_checkpoint_step=-2"],
         "from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, got -2"),
        ([data, ran, "--from_checkpoint_step=7"], "no checkpoint for step 7 in"),
        ([data, ran, "--n_layer=3"], "n_layer=3 contradicts checkpoint step 10, whose model has n_layer=2"),
        (["--dataset=no_such_dataset", fresh], "dataset no_such_dataset: missing"),
        ([data, f"--out_dir={tmp_path / 'a_file' / 'out'}"],
         f"out_dir {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is not a folder"),
        ([data, f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: not a whole zip file"),
        ([data, fresh, "--keep_last_checkpoints=-1"], "keep_last_checkpoints must not be negative, got -1"),
        ([data, fresh, "--learning_rate=1e999"], "learning_rate must be a finite number, got inf"),
        ([data, fresh, str(tmp_path / "nan.py")], "learning_rate must be a finite number, got nan"),
        ([data, fresh, f"--init_from={not_ours / 'ckpt_0000005.pt'}"],
         "not a checkpoint of this trainer: it has no model, no model_args, no step, no meta"),
        ([data, f"--out_dir={weights}"], "has weights but no optimizer or config: it cannot be resumed"),
    ]
    sample_cases = [
        ([ran, "--top_k=-1"], "top_k not negative"),
        ([ran, "--num_samples=0"], "num_samples must be positive, got 0"),
        ([ran, "--tempreature=0.5"], "unknown config key 'tempreature' (did you mean temperature?)"),
        ([ran, "--from_checkpoint_step=7"], "no checkpoint for step 7 in"),
        ([ran, "--from_checkpoint_step=0"], "from_checkpoint_step must be -1 (newest) or a step, got 0"),
        ([ran, "--start=FILE:/no/such/prompt.txt"], "start: cannot read /no/such/prompt.txt"),
        ([ran, "--start=€"], "characters outside the model's vocabulary: '€'"),
        ([f"--out_dir={tmp_path / 'fresh'}"], "no checkpoint to sample from"),
        ([ran, "--temperature=1e999"], "temperature must be a finite number, got inf"),
        ([ran, "--seed=-1"], "seed must be in [0, 2**63), got -1"),
        ([ran, f"--start=FILE:{tmp_path / 'latin1.txt'}"], "latin1.txt is not UTF-8 text"),
        ([ran, f"--start=FILE:{tmp_path}"], "start: cannot read"),
        ([f"--out_dir={not_ours}"], "no usable checkpoint in"),
        ([f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: not a whole zip file"),
    ]
    export_cases = [
        ([f"--out_dir={not_ours}", f"--export_dir={tmp_path / 'hf'}"], "not a checkpoint of this trainer"),
    ]
    extra = [  # values that pass the flag parser and must still be refused before anything is written
        ([data, fresh, "--seed=-1"], "seed must be in [0, 2**63), got -1"),
        ([data, fresh, "--out_dir="], "out_dir must not be empty"),
        ([data, fresh, "--device=cuda:x"], "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
        ([data, fresh, "--compile=1"], "compile must be None, True or False, got 1"),
    ]
    before = files_and_mtimes(tmp_path)
    # in this process, each: the error is one line naming the problem, and nothing is written
    for main, cases in ((train.main, [([*TINY, *args], msg) for args, msg in train_cases + extra]),
                        (sample.main, [(["--device=cpu", *args], msg) for args, msg in sample_cases]),
                        (export.main, export_cases)):
        for args, message in cases:
            with pytest.raises((ConfigError, checkpoint.CheckpointError)) as error:
                main(args)
            assert message in str(error.value) and "\n" not in str(error.value), (args, str(error.value))
    # and as real processes: exit code 2, that one line on stderr, no traceback (train.py's for a CheckpointError:
    # test_a_write_that_fails_part_way_harms_nothing)
    for args, message in [(["train.py", *TINY, *train_cases[0][0]], train_cases[0][1]),
                          (["sample.py", "--device=cpu", *sample_cases[-1][0]], sample_cases[-1][1])]:
        done = run_process(args)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr, done.stderr
    assert files_and_mtimes(tmp_path) == before
    assert not (tmp_path / "fresh").exists()
    assert not checkpoint.describe(str(not_ours))[1]  # listed as refused, the listing itself whole
