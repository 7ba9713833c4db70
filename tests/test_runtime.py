"""runtime.py: the device / dtype decision for CUDA, MPS and CPU (machines described, not needed), the
autocast context, and the peaks that MFU is measured against."""
import math
import os
import platform
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
    assert (plan['device'], plan['dtype'], plan['autocast'], plan['scaler'], plan['pin_memory']) == expected
    assert plan['device_type'] == expected[0].split(':')[0]
    assert ("device='auto'" in plan['why']) == (device == 'auto')
    if plan['dtype'] != dtype and dtype != 'auto':
        assert plan['why']  # a setting that is not followed says why


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
    assert plan['device'] == 'cpu' and plan['autocast'] is None


@pytest.mark.skipif(not runtime.cpu_has_bf16(), reason='a CPU without bfloat16 instructions')
def test_cpu_bfloat16_context_autocasts_at_every_step_and_undoes_it():
    ctx = runtime.setup('cpu', 'bfloat16', verbose=False)['ctx']
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
    assert note == 'measured just now: float32 matmul'


@pytest.mark.parametrize('machine, dtype, expected', [
    ('zen4', 'auto', 'float32'),  # decoding a token at a time: float32 beats autocast on a CPU
    ('zen4', 'bfloat16', 'bfloat16'),  # asked for: kept
    ('h100', 'auto', 'bfloat16'),  # GPUs autocast when decoding too
    ('avx2', 'auto', 'float32'),
])
def test_decoding_on_a_cpu_defaults_to_float32(machine, dtype, expected):
    device = 'cuda' if machine == 'h100' else 'cpu'
    plan = runtime.device_plan(device, dtype, **MACHINES[machine], decoding=True)
    assert plan['dtype'] == expected
    assert (plan['autocast'] is None) == (expected == 'float32')


FAULTS_PER_STEP = """
import resource, sys, torch
import runtime
from model import GPT, GPTConfig
if sys.argv[1] == 'keep':
    runtime.keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128, vocab_size=65))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
X = torch.randint(65, (12, 64))
def step():
    _, loss = model(X, X, return_logits=False)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """With glibc's defaults every step of a small model maps fresh memory for its activations and page-faults
    it in (hundreds of faults a step); runtime.setup keeps freed memory for the next step on a CPU."""
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', FAULTS_PER_STEP, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])
    default, kept = faults('default'), faults('keep')
    assert kept * 3 < default, (kept, default)
