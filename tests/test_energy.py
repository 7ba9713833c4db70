"""energy.py: the accounting with the counters injected at their boundary (an NVML stand-in, a RAPL directory laid
out as the kernel lays it out), the reduction over 2 gloo processes, the unavailable path, the log fields, and the
real probe of this machine."""
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

import energy
from conftest import ROOT, run_script


class FakeGPU:
    """An NVML stand-in. readings: what energy_mj() returns, one a call (the last one repeats); None: no
    total-energy counter (pre-Volta), and power_mw() gives watts * 1000."""

    def __init__(self, readings=None, watts=250.0, name='Fake H100'):
        self.readings, self.watts, self.name = list(readings) if readings else None, watts, name
        self.has_energy = readings is not None
        self.power_reads = 0

    def energy_mj(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def power_mw(self):
        self.power_reads += 1
        return self.watts * 1000


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_known_joules_per_span_and_the_log_fields(capsys):
    # read at start twice (the counter's own first value, the meter's), then once a span
    gpu = FakeGPU([10_000, 10_000, 12_500, 13_000, 18_000])
    meter = energy.start('cuda:0', tokens_per_step=1000, step=5, nvml=gpu)
    assert capsys.readouterr().out == "energy: cuda:0 (Fake H100) through NVML's total-energy counter, the GPU only\n"
    first = meter.span('train', step=6)
    assert (first.joules, first.tokens, first.mj_per_token) == (2.5, 1000, 2.5)
    assert energy.text(first) == ', 2.5 J, 2.5 mJ/tok'
    assert energy.fields(first) == {'energy_j': 2.5, 'mj_per_token': 2.5, 'energy_tokens': 1000}
    second = meter.span('train', step=10)  # four iterations in this span
    assert (second.joules, second.tokens) == (0.5, 4000)
    assert second.mj_per_token == pytest.approx(0.125)
    totals = meter.finish(step=10)
    assert totals == pytest.approx({'energy_total_j': 8.0, 'energy_train_j': 8.0, 'energy_eval_j': 0.0,
                                    'energy_other_j': 0.0, 'energy_mj_per_token': 8.0 * 1000 / 5000})
    assert meter.span('train') is None  # finished
    json.dumps(totals)
    assert energy.summary(totals) == "energy of the run: 8 J (training 8 J), 1.6 mJ per token trained"


def test_evaluations_kept_apart_from_training():
    gpu = FakeGPU([0, 0, 1000, 4000, 4500, 4500, 9500, 10_000, 10_200, 10_300])
    meter = energy.start('cuda:0', tokens_per_step=100, verbose=False, nvml=gpu)
    with meter.during('eval'):  # 1 J of training before it, 3 J inside
        pass
    assert meter.span('eval', tokens=600).joules == 3.0
    assert energy.fields(meter.span('eval')) == {'eval_energy_j': 0.0, 'eval_mj_per_token': None}  # no eval since
    span = meter.span('train', step=1)
    assert span.joules == 6.5 and span.tokens == 100
    with meter.during('eval'):  # 0.5 J of training, 0.2 J of evaluation, then 0.1 J of training
        pass
    totals = meter.finish(step=2)
    assert totals == pytest.approx({'energy_total_j': 10.3, 'energy_train_j': 7.1, 'energy_eval_j': 3.2,
                                    'energy_other_j': 0.0, 'energy_mj_per_token': 7.1 * 1000 / 200})
    assert energy.summary(totals) == ("energy of the run: 10.3 J (training 7.1 J, evaluation 3.2 J), "
                                      "35.5 mJ per token trained")
    with pytest.raises(ValueError, match="'hellaswag' is not one of"):
        with meter.during('hellaswag'):
            pass


def test_a_span_shorter_than_the_update_period_goes_with_the_next():
    # the counter moves only every third read: the spans between are carried, never reported as zero
    gpu = FakeGPU([0, 0, 0, 0, 900, 900, 900, 1800])
    meter = energy.start('cuda:0', tokens_per_step=10, verbose=False, nvml=gpu)
    assert meter.span('train', step=1) is None
    assert meter.span('train', step=2) is None
    span = meter.span('train', step=3)  # the three iterations' energy and tokens together
    assert (span.joules, span.tokens) == (0.9, 30)
    assert energy.text(None) == '' and energy.fields(None) == {}
    assert meter.span('train', step=4) is None
    assert meter.span('train', step=5) is None
    totals = meter.finish(step=5)  # the counter's last move lands in the run's total
    assert totals['energy_total_j'] == pytest.approx(1.8)


def test_a_counter_move_seen_once_for_two_kinds_splits_by_time():
    gpu = FakeGPU([0, 0, 0, 800])
    clock = Clock()
    meter = energy.Meter(energy.NvmlCounter(gpu), clock=clock)
    clock.t = 1.0
    with meter.during('eval'):  # the counter has not moved at its start: the train second waits
        clock.t = 4.0
    assert meter.span('eval').joules == pytest.approx(0.6)
    assert meter.span('train').joules == pytest.approx(0.2)


def test_power_readings_integrated_over_time():
    clock, watts = Clock(), iter([100.0, 100.0, 300.0, 300.0])
    power = energy.PowerIntegral(lambda: next(watts), interval=None, clock=clock)
    clock.t = 1.0
    assert power.read() == (100.0, True)
    clock.t = 2.0
    assert power.read() == (300.0, True)  # trapezoid: 100 W to 300 W over a second
    clock.t = 2.5
    assert power.read()[0] == pytest.approx(450.0)
    # through start(), a GPU without the total-energy counter: sampled by a thread meanwhile
    gpu = FakeGPU(None, watts=250.0)
    t0 = time.monotonic()
    meter = energy.start('cuda:0', tokens_per_step=1000, verbose=False, nvml=gpu)
    assert 'power readings' in meter.what
    time.sleep(0.5)
    span = meter.span('train', step=1)
    elapsed = time.monotonic() - t0
    assert 250.0 * (elapsed - 0.1) < span.joules <= 250.0 * elapsed
    assert gpu.power_reads >= 4  # the thread's samples, not only the reads
    meter.finish()
    reads = gpu.power_reads
    time.sleep(0.25)
    assert gpu.power_reads == reads  # the thread stopped


def write(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(f"{value}\n")


WRAP = 262143328850  # max_energy_range_uj of many Intel packages


def rapl_tree(root, package0=262143000000, dram0=5_000_000, package1=7_000_000):
    """/sys/class/powercap as the kernel lays it out: packages with core, uncore and dram inside, each
    subdomain also linked beside them, psys for the whole platform, the mmio copy of package-0."""
    def zone(path, name, uj):
        write(os.path.join(path, 'name'), name)
        write(os.path.join(path, 'energy_uj'), uj)
        write(os.path.join(path, 'max_energy_range_uj'), WRAP)
    zone(os.path.join(root, 'intel-rapl:0'), 'package-0', package0)
    zone(os.path.join(root, 'intel-rapl:0', 'intel-rapl:0:0'), 'core', 1_000)
    zone(os.path.join(root, 'intel-rapl:0', 'intel-rapl:0:1'), 'uncore', 2_000)
    zone(os.path.join(root, 'intel-rapl:0', 'intel-rapl:0:2'), 'dram', dram0)
    zone(os.path.join(root, 'intel-rapl:1'), 'package-1', package1)
    zone(os.path.join(root, 'intel-rapl:1', 'intel-rapl:1:0'), 'dram', 3_000_000)
    zone(os.path.join(root, 'intel-rapl:2'), 'psys', 9_000_000)
    zone(os.path.join(root, 'intel-rapl-mmio:0'), 'package-0', 4_000_000)
    for sub in ('intel-rapl:0:0', 'intel-rapl:0:1', 'intel-rapl:0:2'):
        os.symlink(os.path.join('intel-rapl:0', sub), os.path.join(root, sub))
    os.symlink(os.path.join('intel-rapl:1', 'intel-rapl:1:0'), os.path.join(root, 'intel-rapl:1:0'))
    return root


def test_rapl_packages_and_dram_with_a_wraparound(tmp_path, capsys):
    root = rapl_tree(str(tmp_path / 'powercap'))
    labels = [label for label, _, _ in energy.cpu_domains(root, str(tmp_path / 'no-hwmon'))]
    assert labels == ['package-0', 'dram of package-0', 'package-1', 'dram of package-1']
    meter = energy.start('cpu', tokens_per_step=100, rapl_root=root, hwmon_root=str(tmp_path / 'no-hwmon'))
    assert capsys.readouterr().out == ("energy: the CPU through RAPL: 2 packages and DRAM, the whole machine's "
                                       "(every process on it, not only this one)\n")
    write(f'{root}/intel-rapl:0/energy_uj', 1_000_000)  # wrapped: 328850 uJ to the top, then 1 J
    write(f'{root}/intel-rapl:0/intel-rapl:0:2/energy_uj', 7_000_000)  # dram +2 J
    write(f'{root}/intel-rapl:1/energy_uj', 10_000_000)  # +3 J
    for counted_elsewhere in ('intel-rapl:0/intel-rapl:0:0', 'intel-rapl:0/intel-rapl:0:1', 'intel-rapl:2', 'intel-rapl-mmio:0'):
        write(f'{root}/{counted_elsewhere}/energy_uj', 99_000_000)
    span = meter.span('train', step=1)
    assert span.joules == pytest.approx((WRAP - 262143000000 + 1_000_000 + 2_000_000 + 3_000_000) / 1e6, abs=1e-9)
    write(f'{root}/intel-rapl:1/intel-rapl:1:0/energy_uj', 3_500_000)  # +0.5 J
    assert meter.span('train', step=2).joules == pytest.approx(0.5)
    write(f'{root}/intel-rapl:1/energy_uj', 10_250_000)
    write(f'{root}/intel-rapl:0/intel-rapl:0:2/energy_uj', '')  # a failed read: nothing lost, carried to the next
    assert meter.span('train', step=3) is None
    write(f'{root}/intel-rapl:0/intel-rapl:0:2/energy_uj', 7_100_000)
    assert meter.span('train', step=4).joules == pytest.approx(0.35)
    assert meter.finish()['energy_total_j'] == pytest.approx(span.joules + 0.85)


def test_amd_energy_hwmon_where_there_is_no_rapl(tmp_path):
    hwmon = tmp_path / 'hwmon'
    write(str(hwmon / 'hwmon0' / 'name'), 'k10temp')
    write(str(hwmon / 'hwmon1' / 'name'), 'amd_energy')
    for n, (label, uj) in enumerate([('Ecore000', 100), ('Ecore001', 200), ('Esocket0', 5_000_000)], 1):
        write(str(hwmon / 'hwmon1' / f'energy{n}_label'), label)
        write(str(hwmon / 'hwmon1' / f'energy{n}_input'), uj)
    meter = energy.start('cpu', verbose=False, rapl_root=str(tmp_path / 'powercap'), hwmon_root=str(hwmon))
    assert 'amd_energy: 1 package,' in meter.what
    write(str(hwmon / 'hwmon1' / 'energy3_input'), 6_250_000)
    write(str(hwmon / 'hwmon1' / 'energy1_input'), 900_000)  # a core: inside its socket's figure
    assert meter.span('train').joules == pytest.approx(1.25)


@pytest.mark.slow
def test_unreadable_rapl_says_which_access_it_needs(tmp_path):
    """As root the files are readable whatever their mode: the probe runs without the capability that allows it."""
    setpriv = shutil.which('setpriv')
    if not setpriv:
        pytest.skip('no setpriv to drop the capability of reading any file')
    root = rapl_tree(str(tmp_path / 'powercap'))
    os.chmod(f'{root}/intel-rapl:0/energy_uj', 0o000)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import energy; "
            f"energy.start('cpu', rapl_root={root!r}, hwmon_root='/nonexistent')")
    result = subprocess.run([setpriv, '--bounding-set=-dac_override,-dac_read_search',
                             '--inh-caps=-dac_override,-dac_read_search', sys.executable, '-c', code],
                            capture_output=True, text=True, timeout=120)
    if 'operation not permitted' in result.stderr.lower():
        pytest.skip(f'setpriv cannot drop capabilities here: {result.stderr.strip()}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"energy not measured here: cannot read {root}/intel-rapl:0/energy_uj (needs read access "
                             f"to {root}/intel-rapl:*/energy_uj: run as root, or sudo chmod a+r them)\n")


@pytest.mark.parametrize('device, expected', [
    ('mps', "energy not measured here: Apple's MPS has no energy counter that a process can read (powermetrics needs sudo)"),
    ('cpu', "energy not measured here: no {root} (not Linux, or a VM or container that hides the CPU's RAPL counters)"),
    ('cpu-empty', "energy not measured here: no RAPL package domain under {root} (a VM, or the intel_rapl driver not "
                  "loaded: sudo modprobe intel_rapl_common)"),
])
def test_unavailable_is_one_line_and_changes_nothing(tmp_path, capsys, device, expected):
    root = str(tmp_path / 'powercap')
    if device == 'cpu-empty':
        rapl_tree(root)
        shutil.rmtree(os.path.join(root, 'intel-rapl:0'))
        shutil.rmtree(os.path.join(root, 'intel-rapl:1'))  # psys and the mmio copy are left: not counted
        device = 'cpu'
    meter = energy.start(device, tokens_per_step=10, rapl_root=root, hwmon_root=str(tmp_path / 'hwmon'))
    assert capsys.readouterr().out == expected.format(root=root) + '\n'
    with meter.during('eval'):
        pass
    assert meter.span('train', step=1) is None and meter.span('eval') is None
    assert meter.finish() == {}
    assert capsys.readouterr().out == ''  # nothing more said
    meter = energy.start('cpu', enabled=False, rapl_root=root)  # turned off: not a word
    assert capsys.readouterr().out == '' and meter.span() is None


def test_missing_pynvml_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pynvml', None)  # import pynvml raises ImportError
    with pytest.raises(energy.NotMeasured, match=r'^no pynvml module for NVML: pip install nvidia-ml-py$'):
        energy.NVML(('index', 0))


def test_pynvml_without_a_driver_is_not_measured():
    pynvml = pytest.importorskip('pynvml')
    try:
        pynvml.nvmlInit()
        pytest.skip('this machine has an NVIDIA driver')
    except pynvml.NVMLError:
        pass
    with pytest.raises(energy.NotMeasured, match=r'^NVML: '):
        energy.NVML(('index', 0))


def test_torch_device_to_nvml_device():
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1b, pci_device_id=0, uuid='5d3b-aa')
    assert energy.nvml_key(props, 1, '2,3') == ('pci', '00000000:1b:00.0')  # the bus id, whatever the numbering
    assert energy.nvml_key(types.SimpleNamespace(uuid='5d3b-aa'), 0) == ('uuid', 'GPU-5d3b-aa')
    assert energy.nvml_key(types.SimpleNamespace(uuid='MIG-77'), 0) == ('uuid', 'MIG-77')
    bare = types.SimpleNamespace()
    assert energy.nvml_key(bare, 1, '2, 3') == ('index', 3)
    assert energy.nvml_key(bare, 1, None) == ('index', 1)
    with pytest.raises(energy.NotMeasured, match='cannot tell which GPU cuda:0 is'):
        energy.nvml_key(bare, 0, 'GPU-aa,GPU-bb')


DDP_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import energy
dist.init_process_group('gloo')
rank = dist.get_rank()


class FakeGPU:
    has_energy, name = True, 'fake'
    def __init__(self, readings):
        self.readings = readings
    def energy_mj(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


# rank 0 spends 1 J then 2 J; rank 1 10 J, then its counter has not moved (not yet), then 30 J
readings = [[0, 0, 1000, 3000, 3000], [0, 0, 10000, 10000, 40000]][rank]
meter = energy.Meter(energy.NvmlCounter(FakeGPU(readings)), ddp=True, device='cpu', tokens_per_step=100)
spans = [meter.span('train', step=s) for s in (1, 2, 3)]
out = {{'spans': [None if s is None else [s.joules, s.tokens] for s in spans], 'totals': meter.finish(step=3)}}
# start(): measured everywhere or nowhere (rank 1 has no RAPL)
meter = energy.start('cpu', ddp=True, rapl_root=sys.argv[1] if rank == 0 else '/nonexistent', hwmon_root='/nonexistent')
out['measured'] = meter.measured
with open(f'result{{rank}}.json', 'w') as f:  # a file each: two processes' prints can interleave
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_the_sum_over_two_gloo_processes(tmp_path):
    script = tmp_path / 'ddp_energy.py'
    script.write_text(DDP_SCRIPT.format(root=ROOT))
    root = rapl_tree(str(tmp_path / 'powercap'))
    result = run_script(tmp_path, script, root, nproc=2, check=True, timeout=240)
    results = [json.loads((tmp_path / f'result{rank}.json').read_text()) for rank in (0, 1)]
    for r in results:
        assert r['spans'] == [[11.0, 100], None, [32.0, 200]]  # the second carried on both, as rank 1 had not moved
        assert r['totals']['energy_total_j'] == pytest.approx(43.0)
        assert r['totals']['energy_mj_per_token'] == pytest.approx(43.0 * 1000 / 300)
        assert r['measured'] is False
    assert "energy not measured here: another process cannot measure it (its first line says why)" in result.stdout
    assert "energy not measured here: no /nonexistent" in result.stdout


def test_the_real_probe_of_this_machine(capsys):
    """What /sys/class/powercap holds here decides what the CPU meter says."""
    domains = []
    for path in sorted(set(os.path.basename(p) for p in __import__('glob').glob('/sys/class/powercap/intel-rapl:*'))):
        try:
            name = open(f'/sys/class/powercap/{path}/name').read().strip()
        except OSError:
            continue
        if name.startswith('package'):
            domains.append(path)
    meter = energy.start('cpu')
    line = capsys.readouterr().out
    if not os.path.isdir('/sys/class/powercap'):
        assert line.startswith('energy not measured here: no /sys/class/powercap ('), line
        assert not meter.measured
    elif not domains:
        assert line.startswith('energy not measured here: '), line
    else:
        readable = os.access(f'/sys/class/powercap/{domains[0]}/energy_uj', os.R_OK)
        assert meter.measured == readable, line
        if readable:
            assert f"{len(domains)} package" in line
            time.sleep(0.1)
            assert meter.span().joules > 0
