import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = f"""
batch_size = 12
learning_rate = 6e-4
compile = True
device = 'cuda'
out_dir = 'out'
top_p = None
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
check('batch_size', lambda v: v >= 1, 'an integer >= 1')
check('top_p', lambda v: v is None or 0 < v <= 1, 'in (0, 1] (or None: no nucleus)')
import json
print('RESULT ' + json.dumps(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile,
                                  device=device, out_dir=out_dir, top_p=top_p,
                                  leaked=[k for k in globals() if 'configure' in k])))
"""


def run(tmp_path, *args, env=None):
    script = tmp_path / 'train.py'
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, **(env or {})))


def result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_key_value_overrides_with_literal_eval(tmp_path):
    r = result(run(tmp_path, '--batch_size=32', '--learning_rate=1e-3', '--compile=False', '--top_p=0.9'))
    assert r == dict(batch_size=32, learning_rate=1e-3, compile=False, device='cuda', out_dir='out',
                     top_p=0.9, leaked=[])


def test_plain_strings_and_int_for_float(tmp_path):
    r = result(run(tmp_path, '--device=cuda:1', '--out_dir=out-2024', '--learning_rate=1'))
    assert r['device'] == 'cuda:1' and r['out_dir'] == 'out-2024'
    assert r['learning_rate'] == 1.0
    # a string setting keeps what was typed even when it reads as a number
    assert result(run(tmp_path, '--out_dir=2024'))['out_dir'] == '2024'
    assert result(run(tmp_path, "--out_dir='quoted'"))['out_dir'] == 'quoted'


def test_config_file_then_overrides_in_order(tmp_path):
    (tmp_path / 'cfg.py').write_text("import math\nbatch_size = 64\nlearning_rate = math.sqrt(1e-6)\n")
    r = result(run(tmp_path, 'cfg.py', '--batch_size=8'))
    assert r['batch_size'] == 8 and r['learning_rate'] == pytest.approx(1e-3)
    assert result(run(tmp_path, '--batch_size=8', 'cfg.py'))['batch_size'] == 64


def test_unknown_key_names_closest_keys(tmp_path):
    proc = run(tmp_path, '--batch_sise=4')
    assert_one_line_error(proc, "unknown setting 'batch_sise'", 'did you mean batch_size')


def test_unknown_key_far_from_any(tmp_path):
    assert_one_line_error(run(tmp_path, '--zzz=4'), "unknown setting 'zzz'", '--help')


def test_unknown_key_in_config_file(tmp_path):
    (tmp_path / 'cfg.py').write_text("learning_rat = 1e-3\n")
    assert_one_line_error(run(tmp_path, 'cfg.py'), "unknown setting 'learning_rat' in cfg.py", 'learning_rate')


@pytest.mark.parametrize('arg, fragments', [
    ('--batch_size=1.5', ['batch_size expects int', 'float 1.5']),
    ('--batch_size=abc', ['batch_size expects int', "str 'abc'"]),
    ('--compile=1', ['compile expects bool', 'int 1']),
    ('--learning_rate=True', ['learning_rate expects float', 'bool True']),
    ('--learning_rate=fast', ['learning_rate expects float']),
])
def test_wrong_type(tmp_path, arg, fragments):
    assert_one_line_error(run(tmp_path, arg), *fragments)


def test_wrong_type_in_config_file(tmp_path):
    (tmp_path / 'cfg.py').write_text("batch_size = '12'\n")
    assert_one_line_error(run(tmp_path, 'cfg.py'), 'batch_size expects int', 'cfg.py')


@pytest.mark.parametrize('arg', ['--batch_size', '--=3', '--batch size=3', '---x=1'])
def test_malformed_argument(tmp_path, arg):
    assert_one_line_error(run(tmp_path, arg), 'malformed argument', '--key=value')


def test_missing_config_file(tmp_path):
    assert_one_line_error(run(tmp_path, 'config/nope.py'), "config file 'config/nope.py' not found")


def test_help_lists_settings(tmp_path):
    proc = run(tmp_path, '--help')
    assert proc.returncode == 0 and '--batch_size=12' in proc.stdout and 'RESULT' not in proc.stdout


@pytest.mark.parametrize('source, fragments', [
    ("batch_size = 1 // 0\n", ['config file cfg.py line 1: ZeroDivisionError']),
    ("import math\n\nbatch_size = batchsize * 2\n", ["config file cfg.py line 3: NameError: name 'batchsize' is not defined"]),
    ("def f():\n    return undefined\nlearning_rate = f()\n", ['config file cfg.py line 2: NameError']),  # where it raised
    ("batch_size = (\n", ['config file cfg.py has a syntax error at line 1']),
    ("batch_size = 1\x00\n", ['config file cfg.py has a syntax error: source code string cannot contain null bytes']),
])
def test_config_file_that_fails_names_its_line(tmp_path, source, fragments):
    (tmp_path / 'cfg.py').write_text(source)
    assert_one_line_error(run(tmp_path, 'cfg.py'), *fragments)


def test_config_file_that_is_not_text(tmp_path):
    (tmp_path / 'cfg.py').write_bytes(b'\xff\xfe\x00binary')
    assert_one_line_error(run(tmp_path, 'cfg.py'), 'cannot read config file cfg.py')


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=0', 'train.py: batch_size=0 is not an integer >= 1'),
    ('--batch_size=None', 'train.py: batch_size=None is not an integer >= 1'),  # None cannot even compare with 1
    ('--top_p=1.5', 'train.py: top_p=1.5 is not in (0, 1] (or None: no nucleus)'),
    ("--top_p='high'", "train.py: top_p='high' is not in (0, 1] (or None: no nucleus)"),
])
def test_check_names_the_setting_its_value_and_what_is_valid(tmp_path, arg, message):
    proc = run(tmp_path, arg)
    assert_one_line_error(proc, message)
    assert proc.stderr.strip() == message and 'RESULT' not in proc.stdout


def test_check_under_torchrun_speaks_once(tmp_path):
    """Every process checks; only the first says why, so that a bad setting is one line, not one per process."""
    proc = run(tmp_path, '--batch_size=0', env={'RANK': '1'})
    assert proc.returncode == 1 and proc.stderr == ''
    assert result(run(tmp_path, '--batch_size=3', env={'RANK': '1'}))['batch_size'] == 3


def test_config_file_may_import_modules_and_define_helpers(tmp_path):
    """nanoGPT's config files are Python: imports, functions and tables are not settings; only the names they
    give plain values are checked."""
    (tmp_path / 'cfg.py').write_text("from math import sqrt\nimport os\n"
                                     "def scaled(x):\n    return x * 2\n"
                                     "TABLE = {'a': 1}\nbatch_size = scaled(int(sqrt(16)))\n")
    out = result(run(tmp_path, 'cfg.py'))
    assert out['batch_size'] == 8


def test_fail_is_importable_without_running_the_configurator(tmp_path):
    """data/ scripts take argparse flags, not settings: importing configurator gives them fail() and parses nothing."""
    code = "import sys; sys.path.insert(0, %r); from configurator import fail; fail('bad input')" % ROOT
    proc = subprocess.run([sys.executable, '-c', code, '--not-a-setting'], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == '-c: bad input', proc.stderr
