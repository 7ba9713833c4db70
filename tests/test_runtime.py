"""runtime.py: the device / dtype decision for CUDA, MPS and CPU (machines described, not needed), the
autocast context, and the peaks that MFU is measured against."""
import math
import os
import subprocess
import sys

import pytest
import torch

import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MACHINES = {  # what device_plan is told the machine has
    'h100': dict(has_cuda=True, cuda_bf16=True, has_mps=False, mps_bf16=False, cpu_bf16=True),
    'v100': dict(has_cuda=True, cuda_bf16=False, has_mps=False, mps_bf16=False, cpu_bf16=False),
    'mac': dict(has_cuda=False, cuda_bf16=False, has_mps=True, mps_bf16=True, cpu_bf16=False),
    'old mac': dict(has_cuda=False, cuda_bf16=False, has_mps=True, mps_bf16=False, cpu_bf16=False),
    'zen4': dict(has_cuda=False, cuda_bf16=False, has_mps=False, mps_bf16=False, cpu_bf16=True),
    'avx2': dict(has_cuda=False, cuda_bf16=False, has_mps=False, mps_bf16=False, cpu_bf16=False),
}
bf16, fp16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize('machine, device, dtype, expected', [
    # machine, settings -> (device, dtype the math runs in, autocast, loss scaling, pinned memory)
    ('h100', 'auto', 'auto', ('cuda', 'bfloat16', bf16, False, True)),
    ('h100', 'cuda:1', 'float16', ('cuda:1', 'float16', fp16, True, True)),
    ('h100', 'cuda', 'float32', ('cuda', 'float32', None, False, True)),
    ('h100', 'cpu', 'auto', ('cpu', 'bfloat16', bf16, False, False)),
    ('v100', 'auto', 'auto', ('cuda', 'float16', fp16, True, True)),
    ('mac', 'auto', 'auto', ('mps', 'float32', None, False, False)),
    ('mac', 'mps', 'float16', ('mps', 'float16', fp16, True, False)),
    ('mac', 'mps', 'bfloat16', ('mps', 'bfloat16', bf16, False, False)),
    ('mac', 'mps', 'float32', ('mps', 'float32', None, False, False)),
    ('old mac', 'mps', 'float16', ('mps', 'float16', fp16, True, False)),
    ('mac', 'cpu', 'auto', ('cpu', 'float32', None, False, False)),
    ('zen4', 'auto', 'auto', ('cpu', 'bfloat16', bf16, False, False)),
    ('zen4', 'cpu', 'bfloat16', ('cpu', 'bfloat16', bf16, False, False)),
    ('zen4', 'cpu', 'float32', ('cpu', 'float32', None, False, False)),
    ('zen4', 'cpu', 'float16', ('cpu', 'float32', None, False, False)),  # emulated on CPUs: slower than float32
    ('avx2', 'auto', 'auto', ('cpu', 'float32', None, False, False)),
    ('avx2', 'cpu', 'bfloat16', ('cpu', 'float32', None, False, False)),  # steps aside without the instructions
])
def test_device_plan(machine, device, dtype, expected):
    plan = runtime.device_plan(device, dtype, **MACHINES[machine])
    assert (plan.device, plan.dtype, plan.autocast, plan.scaler, plan.pin_memory) == expected
    assert plan.device_type == expected[0].split(':')[0]
    assert ("device='auto'" in plan.why) == (device == 'auto')
    if plan.dtype != dtype and dtype != 'auto':
        assert plan.why  # a setting that is not followed says why


@pytest.mark.parametrize('machine, device, dtype, fragments', [
    ('zen4', 'cuda', 'auto', ["device='cuda' but this machine has no CUDA GPU", '--device=auto']),
    ('h100', 'mps', 'auto', ["device='mps' but MPS is not available", '--device=auto']),
    ('mac', 'tpu', 'auto', ["device='tpu' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    ('h100', 'cuda', 'float8', ["dtype='float8' is not one of"]),
    ('v100', 'cuda', 'bfloat16', ['this GPU has no bfloat16', '--dtype=float16']),
    ('old mac', 'mps', 'bfloat16', ['macOS 14', '--dtype=float16']),
])
def test_device_plan_refuses_what_the_machine_cannot_run(machine, device, dtype, fragments):
    with pytest.raises(ValueError) as error:
        runtime.device_plan(device, dtype, **MACHINES[machine])
    message = str(error.value)
    assert '\n' not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason='a machine with a CPU only')
def test_setup_says_what_it_picked(capsys):
    plan = runtime.setup('auto', 'float32')
    assert capsys.readouterr().out == "device cpu, float32 (picked by device='auto')\n"
    assert plan.device == 'cpu' and plan.autocast is None


@pytest.mark.skipif(not runtime.cpu_bf16_fast(), reason='a CPU without fast bfloat16 products')
def test_cpu_bfloat16_context_autocasts_at_every_step_and_undoes_it():
    ctx = runtime.setup('cpu', 'bfloat16', verbose=False).ctx
    a = torch.randn(4, 4)
    for _ in range(2):  # entered at every step
        with ctx:
            assert (a @ a).dtype == torch.bfloat16
        assert (a @ a).dtype == torch.float32


def test_cpu_has_bf16_agrees_with_torch():
    # torch's own detectors are private: used here only as a second opinion
    assert runtime.cpu_has_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@pytest.mark.parametrize('name, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA A100 80GB PCIe', 312e12), ('NVIDIA A10G', 70e12),
    ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362e12), ('NVIDIA GeForce RTX 4090', 165e12),
    ('NVIDIA GeForce RTX 3090', 71e12), ('Tesla V100-SXM2-16GB', 125e12), ('Tesla T4', 65e12),
    ('NVIDIA GeForce GTX 1080', None),
])
def test_gpu_peaks(name, peak):
    assert runtime.gpu_peak_flops(name) == peak


def test_cpu_peak_is_measured_in_the_dtype_used():
    plan = runtime.device_plan('cpu', 'float32', **MACHINES['avx2'])
    peak, note = runtime.peak_flops(plan)
    assert 1e8 < peak < 1e14 and math.isfinite(peak)  # a CPU's FLOP/s, whatever it is
    assert note.startswith('measured just now: the fastest of 0.3 s of 1024x1024 float32 matmuls')
    assert 'MFU stops at 100%' in note  # how the peak was found, and why an MFU above it is not shown


def test_mfu_is_never_above_100_percent():
    """A CPU's peak is measured as a script starts: on a machine busier then than later it reads low, and the
    model's FLOP/s would pass it."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    achieved = model.estimate_mfu(1, 1.0, 1.0)  # FLOPs of one sequence, in 1 s, against a peak of 1 FLOP/s
    assert achieved == 1.0
    assert 0 < model.estimate_mfu(1, 1.0, 1e12) < 1e-6  # below the peak: the plain ratio


@pytest.mark.parametrize('machine, dtype, expected', [
    ('zen4', 'auto', 'float32'),  # decoding a token at a time: float32 beats autocast on a CPU
    ('zen4', 'bfloat16', 'bfloat16'),  # asked for: kept
    ('h100', 'auto', 'bfloat16'),  # GPUs autocast when decoding too
    ('avx2', 'auto', 'float32'),
])
def test_decoding_on_a_cpu_defaults_to_float32(machine, dtype, expected):
    device = 'cuda' if machine == 'h100' else 'cpu'
    plan = runtime.device_plan(device, dtype, **MACHINES[machine], decoding=True)
    assert plan.dtype == expected
    assert (plan.autocast is None) == (expected == 'float32')


@pytest.mark.parametrize('machine, device, dtype, flash_attn, expected', [
    # training's attention: a CPU under bfloat16 autocast takes the explicit products; everywhere else, as asked
    ('zen4', 'auto', 'auto', True, False),
    ('zen4', 'cpu', 'float32', True, True),
    ('avx2', 'auto', 'auto', True, True),
    ('h100', 'auto', 'auto', True, True),
    ('h100', 'cuda', 'auto', False, False),
    ('zen4', 'auto', 'auto', False, False),
])
def test_training_attention_is_settled_with_the_device(machine, device, dtype, flash_attn, expected):
    plan = runtime.device_plan(device, dtype, **MACHINES[machine], training=True, flash_attn=flash_attn)
    assert plan.flash_attn is expected
    assert ('explicit attention' in plan.why) == (flash_attn and not expected)  # a setting not followed says why
    assert runtime.device_plan(device, dtype, **MACHINES[machine], flash_attn=flash_attn).flash_attn is flash_attn


@pytest.mark.parametrize('machine, device, expected', [('avx2', 'auto', False), ('zen4', 'cpu', False), ('h100', 'auto', True)])
def test_training_with_dropout_on_a_cpu_takes_the_explicit_attention(machine, device, expected):
    """sdpa draws its dropout from torch's one generator, which cpu.split_batch's threads cannot share repeatably."""
    plan = runtime.device_plan(device, 'float32', **MACHINES[machine], training=True, dropout=0.1)
    assert plan.flash_attn is expected and ('explicit attention' in plan.why) is not expected
    assert runtime.device_plan(device, 'float32', **MACHINES[machine], training=True, dropout=0.0).flash_attn



@pytest.mark.parametrize('machine, chunked_loss, expected', [
    ('zen4', None, True), ('avx2', None, True),  # measured faster on CPUs
    ('h100', None, False), ('mac', None, False),  # nanoGPT's loss on the logits
    ('h100', True, True), ('zen4', False, False),  # asked for
])
def test_chunked_loss_on_a_cpu_only_unless_asked(machine, chunked_loss, expected):
    plan = runtime.device_plan('auto', 'auto', **MACHINES[machine], training=True, chunked_loss=chunked_loss)
    assert plan.chunked_loss is expected
    assert runtime.device_plan('auto', 'auto', **MACHINES[machine], chunked_loss=chunked_loss).chunked_loss is False


def test_setup_prints_the_training_plan_in_one_line(capsys):
    plan = runtime.setup('cpu', 'float32', training=True)
    assert capsys.readouterr().out == "device cpu, float32, sdpa attention, chunked loss\n"
    assert plan.ctx is not None


def plan_in_a_fresh_process(env):
    """The dtype that runtime.setup('cpu', 'auto') picks for training in a new process with env."""
    code = "import runtime; print(runtime.setup('cpu', 'auto', verbose=False, training=True).dtype)"
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not runtime.cpu_has_bf16(), reason='/proc/cpuinfo lists no bfloat16 instructions')
def test_auto_dtype_is_float32_where_onednn_is_capped_below_bfloat16():
    # the flags still list avx512_bf16, but torch's bfloat16 products run emulated: many times slower than float32
    assert plan_in_a_fresh_process(dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2')) == 'float32'
    assert plan_in_a_fresh_process({k: v for k, v in os.environ.items() if k != 'ONEDNN_MAX_CPU_ISA'}) == 'bfloat16'
