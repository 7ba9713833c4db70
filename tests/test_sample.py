import os
import pickle
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import copy_repo, exit_message, save_tiny_run
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


def tiny_model(seed=0, **kw):
    """A small random GPT whose greedy continuation depends on the whole context (GPT-2's init
    would mostly repeat the last token, which cannot tell a broken cache from a working one)."""
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1)
    return model


def nanogpt_greedy(model, idx, steps):
    """nanoGPT's loop: re-run the (cropped) context for every new token."""
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


# ----------------------------------------------------------------------------- KV-cache generation

@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
@pytest.mark.parametrize('flash', [False, True])
@pytest.mark.parametrize('prompt_len,steps', [(3, 10), (3, 40), (20, 5)])  # inside, past, and a prompt past block_size
def test_cached_greedy_is_nanogpts_loop(position, flash, prompt_len, steps):
    model = tiny_model(position=position, flash_attn=flash)
    idx = torch.randint(0, 50, (2, prompt_len))
    cached = model.generate(idx, steps, top_k=1)
    assert cached.shape == (2, prompt_len + steps)
    assert torch.equal(cached, model.generate(idx, steps, top_k=1, use_cache=False))
    assert torch.equal(cached, nanogpt_greedy(model, idx, steps))


@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
def test_cached_sampling_draws_the_same_tokens(position):
    model = tiny_model(position=position)
    idx = torch.randint(0, 50, (3, 2))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(model.generate(idx, 30, temperature=1.5, top_k=20, top_p=0.9, use_cache=use_cache))
    assert torch.equal(*outs)
    assert len(set(outs[0][0, 2:].tolist())) > 3  # really sampled, not a constant


def test_generate_leaves_the_weights_as_they_were():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 5))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.generate(idx, 8, top_k=1)
    assert all(p.is_contiguous() for p in model.parameters())  # as training and its optimizer expect them
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('flash', [False, True])
def test_kv_cache_is_preallocated_once(flash):
    model = tiny_model(flash_attn=flash)
    kv_cache = [[] for _ in model.transformer.h]
    idx = torch.randint(0, 50, (1, 16))
    model(idx[:, :4], kv_cache=kv_cache)
    k0 = kv_cache[0][0]
    assert k0.shape == (1, 4, 16, 8)  # room for the whole context from the start
    for pos in range(4, 16):
        logits, _ = model(idx[:, pos:pos + 1], kv_cache=kv_cache, pos=pos)
        assert kv_cache[0][0] is k0  # written in place, never re-made or concatenated
        assert torch.allclose(logits, model(idx[:, :pos + 1])[0], atol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 3))
    # top_p so small that only the most likely token survives, or 0, or less: greedy
    for top_p in (1e-6, 0.0, -1.0):
        assert torch.equal(model.generate(idx, 10, top_p=top_p), model.generate(idx, 10, top_k=1))
    # with top_p=0.5 every drawn token is among those the nucleus allows
    torch.manual_seed(1)
    out = model.generate(idx, 12, top_p=0.5, temperature=3.0)
    for t in range(3, 15):
        probs = torch.softmax(model(out[:, :t])[0][:, -1] / 3.0, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        for b in range(2):
            rank = (order[b] == out[b, t]).nonzero().item()
            assert before[b, rank] < 0.5 + 1e-6


@pytest.mark.parametrize('use_cache', [True, False])
def test_temperature_zero_is_greedy(use_cache):
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 4))
    greedy = nanogpt_greedy(model, idx, 30)  # past block_size too
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 30, temperature=0.0, use_cache=use_cache), greedy)
    # top_k and top_p keep the most likely token, so they change nothing; nor does the random state
    torch.manual_seed(1)
    assert torch.equal(model.generate(idx, 30, temperature=0.0, top_k=3, top_p=0.01, use_cache=use_cache), greedy)
    # top_k past the vocabulary means every token
    torch.manual_seed(2)
    wide = model.generate(idx, 12, temperature=1.0, top_k=10_000)
    torch.manual_seed(2)
    assert torch.equal(wide, model.generate(idx, 12, temperature=1.0, top_k=None))


def test_generation_stops_once_every_row_has_the_stop_token():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 3))
    greedy = model.generate(idx, 12, top_k=1)
    stop = greedy[0, 5].item()  # row 0 produces it by its third new token

    def length_up_to_stop(row):
        hits = (row[3:] == stop).nonzero()
        return hits[0].item() + 4 if len(hits) else 15
    expected = max(length_up_to_stop(greedy[b]) for b in range(2))
    out = model.generate(idx, 12, top_k=1, stop_token=stop)
    assert torch.equal(out, greedy[:, :expected])
    one_row = model.generate(idx[:1], 12, top_k=1, stop_token=stop)
    assert torch.equal(one_row, greedy[:1, :length_up_to_stop(greedy[0])])


# ----------------------------------------------------------------------------- sample.py

CHARS = sorted(set("hello world, the quick brown fox!\n"))


def char_meta():
    return {'vocab_size': len(CHARS), 'itos': dict(enumerate(CHARS)), 'stoi': {c: i for i, c in enumerate(CHARS)}}


@pytest.fixture
def workdir(tmp_path):
    """A directory to run sample.py in, as from a repo root, with its own data/ and out/."""
    copy_repo(tmp_path)
    return tmp_path


@pytest.fixture
def char_workdir(workdir):
    """A character-level checkpoint in out/ and its meta.pkl in data/tinychars/."""
    os.makedirs(workdir / 'data' / 'tinychars')
    with open(workdir / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump(char_meta(), f)
    model = tiny_model(vocab_size=len(CHARS), block_size=32)
    save_tiny_run(str(workdir / 'out' / 'ckpt.pt'), model, 'tinychars')
    return workdir, model


def run_sample(cwd, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS='1')  # tiny models, and a CPU shared with other jobs
    return subprocess.run([sys.executable, 'sample.py', '--device=cpu', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def samples(stdout):
    """The printed samples (each is followed by a line of dashes)."""
    body = stdout[stdout.index('assuming GPT-2 encodings...\n') + 28:] if 'assuming GPT-2' in stdout else \
        stdout[stdout.index('meta.pkl...\n') + 12:]
    return body.split('\n---------------\n')[:-1]


def greedy_text(model, prompt, steps, num_samples):
    stoi, itos = char_meta()['stoi'], char_meta()['itos']
    idx = torch.tensor([[stoi[c] for c in prompt]] * num_samples)
    return [''.join(itos[i] for i in row) for row in model.generate(idx, steps, top_k=1).tolist()]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr and result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith('sample.py: ')
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.slow
def test_samples_a_character_model_in_one_batch(char_workdir):
    cwd, model = char_workdir
    result = run_sample(cwd, '--out_dir=out', '--start=hello', '--top_k=1', '--num_samples=3', '--max_new_tokens=12')
    assert result.returncode == 0, result.stderr
    assert 'Loading meta from data/tinychars/meta.pkl' in result.stdout
    assert samples(result.stdout) == greedy_text(model, 'hello', 12, 3)


@pytest.mark.slow
def test_compiled_sampling_gives_the_same_tokens(char_workdir):
    cwd, model = char_workdir
    result = run_sample(cwd, '--out_dir=out', '--start=hello', '--top_k=1', '--num_samples=2', '--max_new_tokens=12',
                        '--compile=True', timeout=600)  # compiling takes tens of seconds
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == greedy_text(model, 'hello', 12, 2)


@pytest.mark.slow
def test_prompt_from_file_and_top_p(char_workdir):
    cwd, model = char_workdir
    (cwd / 'prompt.txt').write_text('the fox,\nhello ')
    result = run_sample(cwd, '--out_dir=out', '--start=FILE:prompt.txt', '--top_k=None', '--top_p=1e-6',
                        '--num_samples=1', '--max_new_tokens=5')
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == greedy_text(model, 'the fox,\nhello ', 5, 1)  # top_p that small: greedy


@pytest.mark.slow
def test_loads_nanogpt_checkpoints(char_workdir):
    cwd, _ = char_workdir
    model = tiny_model(seed=3, vocab_size=len(CHARS))
    save_tiny_run(str(cwd / 'out-old' / 'ckpt.pt'), model, 'tinychars', nanogpt_style=True)
    result = run_sample(cwd, '--out_dir=out-old', '--start=hi', '--top_k=1', '--num_samples=1', '--max_new_tokens=6')
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == greedy_text(model, 'hi', 6, 1)


@pytest.mark.slow
def test_bad_prompts_get_one_line_errors(char_workdir):
    cwd, _ = char_workdir
    (cwd / 'empty.txt').write_text('')
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=FILE:empty.txt'), 'empty.txt is empty')
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=FILE:nothere.txt'), 'no prompt file nothere.txt')
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=hello WORLD€'),
                          'outside the model', "'D', 'L', 'O', 'R', 'W', '€'")


def test_temperature_zero_gives_the_argmax_samples_every_time(char_workdir, monkeypatch, capsys):
    cwd, model = char_workdir
    monkeypatch.chdir(cwd)
    runs = []
    for extra in (['--seed=1'], ['--seed=2', '--top_k=None']):  # two runs, inside this process: no start-up to pay for
        monkeypatch.setattr(sys, 'argv', ['sample.py', '--device=cpu', '--out_dir=out', '--start=the ', '--temperature=0',
                                          '--num_samples=3', '--max_new_tokens=40', '--top_p=0.9', *extra])
        runpy.run_path('sample.py', run_name='__main__')
        runs.append(samples(capsys.readouterr().out))
    stoi, itos = char_meta()['stoi'], char_meta()['itos']
    argmax = nanogpt_greedy(model, torch.tensor([[stoi[c] for c in 'the ']]), 40)[0].tolist()  # past block_size=32
    assert runs[0] == runs[1] == [''.join(itos[i] for i in argmax)] * 3


@pytest.mark.parametrize('args, fragment', [
    (['--num_samples=0'], 'num_samples=0 is not an integer >= 1'),
    (['--max_new_tokens=0'], 'max_new_tokens=0 is not an integer >= 1'),
    (['--max_new_tokens=-5'], 'max_new_tokens=-5 is not an integer >= 1'),
    (['--temperature=-0.5'], 'temperature=-0.5 is not a number >= 0 (0: always the most likely token)'),
    (['--top_k=0'], 'top_k=0 is not an integer >= 1 (or None: no limit)'),
    (['--top_k=-3'], 'top_k=-3 is not an integer >= 1'),
    (['--top_p=0.0'], 'top_p=0.0 is not in (0, 1] (or None: no nucleus)'),
    (['--top_p=1.5'], 'top_p=1.5 is not in (0, 1]'),
    (['--top_p=-0.1'], 'top_p=-0.1 is not in (0, 1]'),
    (['--top_p=high'], "top_p='high' is not in (0, 1]"),
    (['--dtype=fp16'], "dtype='fp16' is not one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (['--device=gpu'], "device='gpu' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (['--init_from=gtp2'], "init_from must be 'resume', a GPT-2 variant"),
])
def test_bad_settings_get_a_one_line_error(char_workdir, monkeypatch, args, fragment):
    cwd, _ = char_workdir
    assert fragment in exit_message(monkeypatch, cwd, 'sample.py', '--device=cpu', '--out_dir=out', *args)


@pytest.mark.slow
def test_missing_checkpoint_is_a_one_line_error(workdir):
    assert_one_line_error(run_sample(workdir, '--out_dir=out-nothing'), 'no checkpoint out-nothing/ckpt.pt', 'train.py')


class Payload:
    """Stands for arbitrary code: unpickling a Payload creates the file at self.path."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.mark.slow
def test_malicious_meta_pkl_is_refused_and_runs_nothing(char_workdir):
    cwd, _ = char_workdir
    marker = cwd / 'pwned'
    meta = dict(char_meta(), extra=Payload(str(marker)))
    with open(cwd / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    result = run_sample(cwd, '--out_dir=out', '--start=hello')
    assert_one_line_error(result, 'meta.pkl is not a plain vocabulary pickle', 'open', 'prepare.py')
    assert not marker.exists()
    with open(cwd / 'data' / 'tinychars' / 'meta.pkl', 'rb') as f:
        pickle.load(f)  # an ordinary unpickler would have run it
    assert marker.exists()


@pytest.mark.slow
def test_checkpoint_with_objects_is_refused(workdir):
    model = tiny_model()
    save_tiny_run(str(workdir / 'out' / 'ckpt.pt'), model, None)
    ckpt = torch.load(workdir / 'out' / 'ckpt.pt', weights_only=True)
    ckpt['config']['hook'] = Payload(str(workdir / 'pwned'))
    torch.save(ckpt, workdir / 'out' / 'ckpt.pt')
    assert_one_line_error(run_sample(workdir, '--out_dir=out'), 'cannot load out/ckpt.pt safely')
    assert not (workdir / 'pwned').exists()


@pytest.mark.slow
def test_stops_at_end_of_text(workdir):
    model = tiny_model(vocab_size=50304, n_embd=32)
    with torch.no_grad():  # make <|endoftext|> (50256) the most likely next token after anything
        direction = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[50256] = 10 * direction
    save_tiny_run(str(workdir / 'out' / 'ckpt.pt'), model, None)
    result = run_sample(workdir, '--out_dir=out', '--start=Once upon a time', '--num_samples=2', '--max_new_tokens=50')
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == ['Once upon a time'] * 2
    assert '<|endoftext|>' not in result.stdout


@pytest.mark.slow
def test_samples_a_local_hugging_face_gpt2(workdir):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(workdir / 'my-gpt2')
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    idx = torch.tensor([enc.encode('Hello world')])
    with torch.no_grad():  # Hugging Face's greedy continuation
        for _ in range(6):
            idx = torch.cat((idx, hf(idx).logits[:, -1:].argmax(-1)), dim=1)
    tokens = idx[0].tolist()
    expected = enc.decode(tokens[:tokens.index(50256, 2)] if 50256 in tokens[2:] else tokens)
    result = run_sample(workdir, '--init_from=my-gpt2', '--start=Hello world', '--top_k=1', '--num_samples=1',
                        '--max_new_tokens=6')
    assert result.returncode == 0, result.stderr
    assert 'loading weights from pretrained gpt: my-gpt2' in result.stdout
    assert samples(result.stdout) == [expected]


# ----------------------------------------------------------------------------- issue 21: prompts and vocabularies

def record_vocabulary(path, meta):
    """Adds the data record train.py writes (the dataset, its vocabulary size and meta.pkl) to the checkpoint."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['data'] = {'dataset': 'tinychars', 'vocab_size': meta['vocab_size'], 'meta': meta}
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_a_latin_1_prompt_file_is_one_line_naming_it(char_workdir):
    cwd, _ = char_workdir
    (cwd / 'latin.txt').write_bytes('hello café'.encode('latin-1'))
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=FILE:latin.txt'),
                          'the prompt file latin.txt is not UTF-8 text', 'iconv -f latin1 -t utf-8 latin.txt')


@pytest.mark.slow
def test_missing_meta_pkl_decodes_with_the_recorded_vocabulary(char_workdir):
    cwd, model = char_workdir
    record_vocabulary(str(cwd / 'out' / 'ckpt.pt'), char_meta())
    os.remove(cwd / 'data' / 'tinychars' / 'meta.pkl')
    result = run_sample(cwd, '--out_dir=out', '--start=hello', '--top_k=1', '--num_samples=2', '--max_new_tokens=12')
    assert result.returncode == 0, result.stderr
    note = 'data/tinychars/meta.pkl is missing: decoding with the vocabulary recorded in the checkpoint\n'
    assert note in result.stdout and 'GPT-2' not in result.stdout
    body = result.stdout[result.stdout.index(note) + len(note):]
    assert body.split('\n---------------\n')[:-1] == greedy_text(model, 'hello', 12, 2)


@pytest.mark.slow
def test_missing_meta_pkl_and_no_recorded_vocabulary_is_refused(char_workdir):
    cwd, _ = char_workdir  # an older checkpoint: no data record
    os.remove(cwd / 'data' / 'tinychars' / 'meta.pkl')
    result = run_sample(cwd, '--out_dir=out', '--start=hello', '--max_new_tokens=2')
    assert_one_line_error(result, f'vocabulary of {len(CHARS)} tokens, not GPT-2', 'no data/tinychars/meta.pkl')
    assert result.stdout.count('---------------') == 0


@pytest.mark.slow
def test_a_meta_pkl_other_than_the_recorded_one_is_refused(char_workdir):
    cwd, _ = char_workdir
    record_vocabulary(str(cwd / 'out' / 'ckpt.pt'), char_meta())
    other = sorted(set("HELLO WORLD, THE QUICK BROWN FOX!\n"))  # re-prepared from another text, the same size
    assert len(other) == len(CHARS)
    with open(cwd / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(other), 'itos': dict(enumerate(other)), 'stoi': {c: i for i, c in enumerate(other)}}, f)
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=HELLO', '--max_new_tokens=2'),
                          'data/tinychars/meta.pkl is not the vocabulary out/ckpt.pt was trained with')
    with open(cwd / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:  # another size too
        pickle.dump({'vocab_size': 3, 'itos': {0: 'a', 1: 'b', 2: 'c'}, 'stoi': {'a': 0, 'b': 1, 'c': 2}}, f)
    assert_one_line_error(run_sample(cwd, '--out_dir=out', '--start=abc', '--max_new_tokens=2'),
                          'data/tinychars/meta.pkl is not the vocabulary')


@pytest.mark.slow
def test_the_same_meta_pkl_as_recorded_samples(char_workdir):
    cwd, model = char_workdir
    record_vocabulary(str(cwd / 'out' / 'ckpt.pt'), char_meta())
    result = run_sample(cwd, '--out_dir=out', '--start=hello', '--top_k=1', '--num_samples=1', '--max_new_tokens=6')
    assert result.returncode == 0, result.stderr
    assert samples(result.stdout) == greedy_text(model, 'hello', 6, 1)
