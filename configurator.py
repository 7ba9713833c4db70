"""
Settings overrides, nanoGPT style, and the one way every script stops on bad input. A script runs this file
(nanoGPT's exec, found beside the script, so that the script runs from any directory) with
    exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
after defining its settings as plain globals; then, for example,
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
runs config/train_shakespeare_char.py as Python and then sets batch_size and compile.
--key=value overrides a known global (a lower-case name whose value is a bool, int, float, str or None), the
value read with ast.literal_eval (a plain string when that fails). A config file may import modules and
define helpers: only the lower-case names it gives a bool, int, float, str or None are settings (a name with
a capital letter, such as GPT2_VOCAB_SIZE, is a constant). An unknown key, a value of the wrong type, a
malformed argument or a config file that fails (the error and its line) stops the program with a one-line
error. --help lists the settings.
The script imports fail(msg), which stops with one line `script: msg`, and check(), for its checks of the
values: `from configurator import fail, check` (scripts that take no settings, data/, import fail alone).
Run from another directory (python /path/to/repo/train.py config/x.py, as Slurm scripts do), config files
are found relative to the current directory, as any path on the command line.
"""


def fail(msg, every_process=False):
    """Stop with a one-line error, `script: msg`, and exit status 1. Under torchrun only the first process
    prints it (every process checks the same settings), unless every_process: an error of this process alone."""
    import os
    import sys
    prog = sys.argv[0] if sys.argv[0] and not os.path.isabs(sys.argv[0]) else os.path.basename(sys.argv[0] or 'python')
    sys.exit(f"{prog}: {msg}" if every_process or os.environ.get('RANK', '0') == '0' else 1)


def check(name, ok, valid):
    """For the scripts' checks of their settings, before any work: unless ok(value) holds, stop with a
    one-line error naming the setting, its value and what would be valid, e.g.
        check('batch_size', lambda v: v >= 1, 'an integer >= 1')  ->  train.py: batch_size=0 is not an integer >= 1
    A value ok cannot even compare (None where a number belongs) is not valid either. name is a global (a
    setting) of the module that calls check."""
    import sys
    value = sys._getframe(1).f_globals[name]
    try:
        passed = ok(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: torch.device of a malformed string
        passed = False
    if not passed:
        fail(f"{name}={value!r} is not {valid}")


def _configure(settings):
    import ast
    import builtins  # scripts have settings named like builtins (compile)
    import difflib
    import os
    import sys
    import traceback

    prog = os.path.basename(sys.argv[0])

    def is_setting(key, value):  # a name with a capital letter is a constant (GPT2_VOCAB_SIZE), not a setting
        return key.islower() and not key.startswith('_') and (value is None or isinstance(value, (bool, int, float, str)))
    known = {k: v for k, v in settings.items() if is_setting(k, v)}

    def unknown_key(key, where):
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; run {prog} --help for the settings"
        fail(f"unknown setting '{key}' in {where}{hint}")

    def checked(key, value, where):
        """value converted to the type of key's default, or a one-line error."""
        default = known[key]
        if default is None or value is None:
            return value
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float) and isinstance(value, int):  # an int where a float is expected is fine
            return float(value)
        else:
            ok = type(value) is type(default)
        if not ok:
            fail(f"{key} expects {type(default).__name__} (default {default!r}), "
                 f"got {type(value).__name__} {value!r} in {where}")
        return value

    for arg in sys.argv[1:]:
        if arg in ('-h', '--help'):
            print(f"settings of {prog} (override with --key=value or a config file):" if known else f"{prog} takes no settings")
            for k, v in known.items():
                print(f"  --{k}={v!r}")
            sys.exit(0)
        if not arg.startswith('--'):
            # a config file: run it as Python on top of the current settings
            if not os.path.isfile(arg):
                fail(f"config file '{arg}' not found (expected a path like config/train_shakespeare_char.py, "
                     f"or --key=value)")
            namespace = dict(known)
            print(f"Overriding config with {arg}:")
            try:
                with open(arg, encoding='utf-8') as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError) as e:
                fail(f"cannot read config file {arg} ({e}): it should be a Python file of settings")
            print(source)
            try:
                builtins.exec(builtins.compile(source, arg, 'exec'), namespace)
            except SyntaxError as e:
                fail(f"config file {arg} has a syntax error{f' at line {e.lineno}' if e.lineno else ''}: {e.msg}")
            except Exception as e:  # it ran and raised, e.g. a misspelt name (NameError) or 1 // 0
                lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == arg]
                fail(f"config file {arg} line {lines[-1] if lines else '?'}: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith('_') or key in ('fail', 'check'):
                    continue
                if key not in known:
                    if is_setting(key, value):
                        unknown_key(key, arg)
                    continue  # an imported module, a helper function or a constant: not a setting
                if value is not known[key]:
                    known[key] = settings[key] = checked(key, value, arg)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq or not key.isidentifier():
                fail(f"malformed argument '{arg}': expected --key=value, e.g. --batch_size=32")
            if key not in known:
                unknown_key(key, f"'{arg}'")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a plain string, e.g. --device=cuda:1 or --out_dir=out-shakespeare
            if isinstance(known[key], str) and not isinstance(value, str):
                value = text  # a string setting keeps what was typed, e.g. --wandb_run_name=2024
            value = checked(key, value, f"'{arg}'")
            print(f"Overriding: {key} = {value!r}")
            known[key] = settings[key] = value


if __name__ != 'configurator':  # run by a script's exec(); `from configurator import fail` only defines
    _configure(globals())
del _configure

