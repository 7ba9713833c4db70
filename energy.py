"""
Energy of training and of generation, read from the hardware's own counters, as the fork's usage_logger did:
NVIDIA GPUs through NVML (the total-energy counter, Volta and newer; else power readings integrated over time),
Linux CPUs through RAPL (/sys/class/powercap, package and DRAM domains; AMD's amd_energy hwmon where that is what
the kernel gives). Elsewhere (Apple MPS, a VM without RAPL, no NVML) one line says so and every span is None.

train.py starts a meter, marks its evaluations, and asks for a span at each log line:
    meter = energy.start(device, ddp=ddp, verbose=master_process, tokens_per_step=tokens_per_iter, step=iter_num)
    with meter.during('eval'):
        losses = estimate_loss()
    e = meter.span('eval')                      # every process calls it: the sum over them, or None
    e = meter.span('train', step=iter_num + 1)  # joules of the iterations since the last train span
    totals = meter.finish(step=iter_num)        # the run's energy_total_j, energy_train_j, energy_eval_j, ...
energy.text(e) is the iteration line's ', 12.3 J, 4.5 mJ/tok', energy.fields(e) the log.jsonl fields and
energy.summary(totals) the run's line.
bench.py --energy_toggles=True compares the toggles with a meter. What this machine measures, how fast, how often
the counter moves:
    python energy.py [cpu|cuda|cuda:N]
"""
import glob
import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch

RAPL_ROOT = '/sys/class/powercap'
HWMON_ROOT = '/sys/class/hwmon'
KINDS = ('train', 'eval', 'other')  # kept apart (other: checkpoint writes, HellaSwag); the same on every process


class NotMeasured(Exception):
    """Energy cannot be measured here; the message says why, and how to make it measurable where one can."""


# -----------------------------------------------------------------------------
# NVIDIA GPUs: the NVML calls go through one small object, which tests replace with a stand-in

class NVML:
    """The NVML calls the meter makes for one GPU. A stand-in needs the same members: name, has_energy,
    energy_mj() (the counter since the driver loaded, millijoules) and power_mw() (milliwatts now)."""

    def __init__(self, key):
        try:
            import pynvml  # nvidia-ml-py: pure Python, it fails only at nvmlInit where there is no driver
        except ImportError:
            raise NotMeasured("no pynvml module for NVML: pip install nvidia-ml-py") from None
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
            kind, value = key
            if kind == 'pci':
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(value)
            elif kind == 'uuid':
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(value)
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(value)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        except pynvml.NVMLError as e:
            raise NotMeasured(f"NVML: {e}") from None
        try:
            self.power_mw()  # a GPU with neither reading is not measured
        except OSError as e:
            raise NotMeasured(str(e)) from None
        try:
            self.energy_mj()
            self.has_energy = True
        except OSError:  # NOT_SUPPORTED before Volta
            self.has_energy = False

    def energy_mj(self):
        try:
            return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except self.nv.NVMLError as e:
            raise OSError(f"NVML: {e}") from None

    def power_mw(self):
        try:
            return self.nv.nvmlDeviceGetPowerUsage(self.handle)
        except self.nv.NVMLError as e:
            raise OSError(f"NVML: {e}") from None


def nvml_key(props, index, visible=None):
    """How NVML finds torch's cuda:index: by PCI bus id, else by UUID, from torch.cuda.get_device_properties
    (NVML numbers every GPU of the machine, torch only those CUDA_VISIBLE_DEVICES leaves, and maybe in
    another order). Failing both, the index through CUDA_VISIBLE_DEVICES, when it lists plain numbers."""
    if getattr(props, 'pci_bus_id', None) is not None and getattr(props, 'pci_domain_id', None) is not None:
        return 'pci', f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    uuid = str(getattr(props, 'uuid', '') or '')
    if uuid:
        return 'uuid', uuid if uuid.startswith(('GPU-', 'MIG-')) else f"GPU-{uuid}"
    visible = [v.strip() for v in visible.split(',')] if visible else []
    if visible and index < len(visible) and visible[index].isdigit():
        return 'index', int(visible[index])
    if visible:
        raise NotMeasured(f"cannot tell which GPU cuda:{index} is among CUDA_VISIBLE_DEVICES={','.join(visible)}")
    return 'index', index


class NvmlCounter:
    """The GPU's total-energy counter. It moves only every so often (its update period): a read that finds it where
    the last one left it is not fresh, and the time since goes with the next read that moves."""

    def __init__(self, nvml):
        self.nvml = nvml
        self.first = self.last = nvml.energy_mj()

    def read(self):
        mj = self.nvml.energy_mj()
        fresh, self.last = mj != self.last, mj
        return (mj - self.first) / 1000, fresh


class PowerIntegral:
    """Power readings integrated over time (trapezoids), for GPUs without the energy counter: sampled by a thread
    every interval seconds, and at every read; interval=None samples at reads only."""

    def __init__(self, read_watts, interval=0.1, clock=time.monotonic):
        self.read_watts, self.clock = read_watts, clock
        self.lock = threading.Lock()
        self.joules, self.t, self.w = 0.0, clock(), read_watts()
        self.stopped = threading.Event()
        if interval:
            threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def _run(self, interval):
        while not self.stopped.wait(interval):
            try:
                self.sample()
            except (OSError, ValueError):  # a failed reading: the next sample's trapezoid spans the gap
                pass

    def sample(self):
        with self.lock:
            t, w = self.clock(), self.read_watts()
            self.joules += (w + self.w) / 2 * (t - self.t)
            self.t, self.w = t, w
            return self.joules

    def read(self):
        return self.sample(), True

    def close(self):
        self.stopped.set()


# -----------------------------------------------------------------------------
# Linux CPUs: RAPL through powercap, or the amd_energy hwmon driver

def read_uj(path):
    with open(path) as f:
        return int(f.read())


def cpu_domains(rapl_root=RAPL_ROOT, hwmon_root=HWMON_ROOT):
    """The counters of the CPUs' package and DRAM energy: [(label, energy file, wraps at)], each domain once.
    powercap lists a package's subdomains both inside it and beside it; core and uncore are part of the
    package, psys (the whole platform) holds all of them: those are left out. dram is outside the package."""
    found = {}
    for path in glob.glob(os.path.join(rapl_root, 'intel-rapl:*')) + \
            glob.glob(os.path.join(rapl_root, 'intel-rapl:*', 'intel-rapl:*:*')):
        found.setdefault(os.path.basename(path), path)
    domains = []
    for base, path in sorted(found.items()):
        try:
            with open(os.path.join(path, 'name')) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith('package') or name == 'dram':
            label = name if name.startswith('package') else f"{name} of package-{base.split(':')[1]}"
            domains.append((label, os.path.join(path, 'energy_uj'), os.path.join(path, 'max_energy_range_uj')))
    if domains:
        out = []
        for label, energy_file, range_file in domains:
            try:
                read_uj(energy_file)
                wraps_at = read_uj(range_file)
            except PermissionError:
                raise NotMeasured(f"cannot read {energy_file} (needs read access to {rapl_root}/intel-rapl:*/energy_uj: "
                                  f"run as root, or sudo chmod a+r them)") from None
            out.append((label, energy_file, wraps_at))
        return out
    for hwmon in sorted(glob.glob(os.path.join(hwmon_root, 'hwmon*'))):  # the amd_energy driver, where there is no RAPL
        try:
            with open(os.path.join(hwmon, 'name')) as f:
                if f.read().strip() != 'amd_energy':
                    continue
        except OSError:
            continue
        out = []
        for label_file in sorted(glob.glob(os.path.join(hwmon, 'energy*_label'))):
            with open(label_file) as f:
                label = f.read().strip()
            if label.startswith('Esocket'):  # the cores' counters are inside their socket's
                energy_file = label_file[:-len('label')] + 'input'
                try:
                    read_uj(energy_file)
                except PermissionError:
                    raise NotMeasured(f"cannot read {energy_file} (needs read access to {hwmon}/energy*_input: "
                                      f"run as root, or sudo chmod a+r them)") from None
                out.append((label, energy_file, None))  # the driver keeps a 64-bit sum: no wraparound
        if out:
            return out
    if not os.path.isdir(rapl_root):
        raise NotMeasured(f"no {rapl_root} (not Linux, or a VM or container that hides the CPU's RAPL counters)")
    raise NotMeasured(f"no RAPL package domain under {rapl_root} (a VM, or the intel_rapl driver not loaded: "
                      f"sudo modprobe intel_rapl_common)")


class Rapl:
    """The sum of the CPU domains' counters, in joules since the start; a counter that went down wrapped around."""

    def __init__(self, domains):
        self.domains = domains
        self.last = [read_uj(path) for _, path, _ in domains]
        self.joules = 0.0

    def read(self):
        now = [read_uj(path) for _, path, _ in self.domains]  # all of them, or (an error) none
        moved = sum(n - last if n >= last else n + (wraps_at or 0) - last
                    for n, last, (_, _, wraps_at) in zip(now, self.last, self.domains))
        self.last = now
        self.joules += moved / 1e6
        return self.joules, moved != 0


class Nothing:
    """What a process adds that leaves the measuring to another on its machine (RAPL counts the whole CPU)."""

    def read(self):
        return 0.0, True


# -----------------------------------------------------------------------------
# the meter: spans of the run, kept apart by kind, summed over processes when they are reported

class Span:
    """The energy of one reported span, summed over the processes, and the tokens it was spent on."""

    def __init__(self, kind, joules, tokens):
        self.kind, self.joules, self.tokens = kind, joules, tokens

    @property
    def mj_per_token(self):
        return self.joules * 1000 / self.tokens if self.tokens else None

    def __repr__(self):
        return f"Span({self.kind!r}, {self.joules} J, {self.tokens} tokens)"


def text(span):
    """For a log line: ', 12.3 J, 4.5 mJ/tok'; '' for None (not measured here, or carried to the next span)."""
    if span is None:
        return ''
    per_token = f", {span.mj_per_token:.3g} mJ/tok" if span.tokens else ''
    return f", {span.joules:.4g} J{per_token}"


def fields(span):
    """For log.jsonl: energy_j, mj_per_token and energy_tokens of a training span; eval_energy_j and
    eval_mj_per_token of an evaluation (kind_ for any other kind); nothing for None."""
    if span is None:
        return {}
    if span.kind == 'train':
        return {'energy_j': span.joules, 'mj_per_token': span.mj_per_token, 'energy_tokens': span.tokens}
    return {f'{span.kind}_energy_j': span.joules, f'{span.kind}_mj_per_token': span.mj_per_token}


def summary(totals):
    """The run's energy in one line, from finish()'s fields."""
    per_token = totals.get('energy_mj_per_token')
    parts = ', '.join(f"{k[7:-2].replace('train', 'training').replace('eval', 'evaluation')} {v:.4g} J"
                      for k, v in totals.items() if k.endswith('_j') and k != 'energy_total_j' and v)
    return (f"energy of the run: {totals['energy_total_j']:.4g} J" + (f" ({parts})" if parts else '') +
            (f", {per_token:.3g} mJ per token trained" if per_token else ''))


class Meter:
    """Energy since start, split into spans. The counters are read only at during()'s edges and at span() and
    finish(); span() and finish() are collective under DDP (every process calls them at the same points: one
    all_reduce of a small tensor each), during() is not. Where nothing is measured they return None and {}."""

    def __init__(self, source=None, what='', ddp=False, device='cpu', tokens_per_step=0, step=0, kinds=KINDS,
                 sync=None, clock=time.monotonic):
        self.source, self.what, self.ddp, self.device = source, what, ddp, device
        self.tokens_per_step, self.step, self.kinds, self.sync, self.clock = tokens_per_step, step, kinds, sync, clock
        self.kind = kinds[0]
        self.acc = dict.fromkeys(kinds, 0.0)  # this process's joules, not yet reported
        self.tokens = dict.fromkeys(kinds, 0)  # tokens of spans carried to the next
        self.totals = dict.fromkeys(kinds, 0.0)  # reported joules, summed over processes
        self.pending = []  # [kind, seconds] since the counter last moved: they share its next move
        self.start_step = step
        self.t = clock()
        self.joules = source.read()[0] if source is not None else 0.0  # the counter where the meter started

    @property
    def measured(self):
        return self.source is not None

    def _read(self):
        now = self.clock()
        try:
            joules, fresh = self.source.read()
        except (OSError, ValueError):  # a failed read changes nothing: what it missed lands with the next one
            joules, fresh = self.joules, False
        if self.pending and self.pending[-1][0] == self.kind:
            self.pending[-1][1] += now - self.t
        else:
            self.pending.append([self.kind, now - self.t])
        self.t = now
        if fresh:
            moved = joules - self.joules
            seconds = sum(s for _, s in self.pending)
            for kind, s in self.pending:  # time shares: a counter update seen once for two kinds splits between them
                self.acc[kind] += moved * (s / seconds if seconds > 0 else 1 / len(self.pending))
            self.pending = []
            self.joules = joules

    def _reduce(self, values):
        if not self.ddp:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    @contextmanager
    def during(self, kind):
        """The energy spent inside the block goes to kind (e.g. 'eval'); the device is synchronized at its edges,
        so that the queued work lands on the right side (once an evaluation: nothing measurable)."""
        if kind not in self.kinds:
            raise ValueError(f"energy kind {kind!r} is not one of the meter's {self.kinds}")
        if not self.measured:
            yield
            return
        before = self.kind
        if self.sync:
            self.sync()
        self._read()
        self.kind = kind
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self._read()
            self.kind = before

    def span(self, kind='train', step=None, tokens=0):
        """The Span of kind since its last one, summed over the processes; tokens: those it was spent on (train:
        step, the steps done so far, gives them as tokens_per_step each). None when not measured, or when the
        counter of some process has not moved since its time of kind began (its update period): that span is
        carried, whole, into the next one of its kind, never reported as zero."""
        if not self.measured:
            return None
        self._read()
        waiting = float(self.acc[kind] == 0 and any(k == kind for k, _ in self.pending))
        joules, waiting = self._reduce([self.acc[kind], waiting])
        tokens += self.tokens[kind]
        if step is not None:
            tokens += (step - self.step) * self.tokens_per_step
            self.step = step
        if waiting:
            self.tokens[kind] = tokens
            return None
        self.acc[kind], self.tokens[kind] = 0.0, 0
        self.totals[kind] += joules
        return Span(kind, joules, tokens)

    def finish(self, step=None, wait=1.0):
        """The run's energy, for its last log record: energy_total_j, energy_<kind>_j for every kind and
        energy_mj_per_token (training's, over the tokens trained since start). Collective under DDP. Waits up to
        wait seconds for a counter that has not moved since the last read."""
        if not self.measured:
            return {}
        if self.sync:
            self.sync()
        deadline = self.clock() + wait
        self._read()
        while self.pending and self.clock() < deadline:
            time.sleep(0.002)
            self._read()
        if hasattr(self.source, 'close'):
            self.source.close()
        for kind, joules in zip(self.kinds, self._reduce([self.acc[k] for k in self.kinds])):
            self.totals[kind] += joules
            self.acc[kind] = 0.0
        if step is not None:
            self.step = step
        trained = (self.step - self.start_step) * self.tokens_per_step
        out = {'energy_total_j': sum(self.totals.values()), **{f'energy_{k}_j': self.totals[k] for k in self.kinds}}
        if 'train' in self.kinds:
            out['energy_mj_per_token'] = self.totals['train'] * 1000 / trained if trained else None
        self.source = None  # finished: later spans are None
        return out


def start(device, enabled=True, ddp=False, verbose=True, tokens_per_step=0, step=0, kinds=KINDS, nvml=None,
          rapl_root=RAPL_ROOT, hwmon_root=HWMON_ROOT):
    """The meter of this process's device, started now. Prints one line when verbose: what is measured, or
    that energy is not measured here and why. nvml: a stand-in for NVML (tests). Under DDP every process
    must call it (one all_reduce: measured everywhere, or nowhere)."""
    device = torch.device(device)
    source, what = None, ''
    sync = None
    if not enabled:
        return Meter(None, kinds=kinds)
    try:
        if device.type == 'cuda':
            index = device.index if device.index is not None else torch.cuda.current_device()
            if nvml is None:
                nvml = NVML(nvml_key(torch.cuda.get_device_properties(index), index,
                                     os.environ.get('CUDA_VISIBLE_DEVICES')))
            if nvml.has_energy:
                source, how = NvmlCounter(nvml), "NVML's total-energy counter"
            else:
                source, how = PowerIntegral(lambda: nvml.power_mw() / 1000), "NVML's power readings, every 0.1 s"
            what = f"cuda:{index} ({nvml.name}) through {how}, the GPU only"
            sync = lambda: torch.cuda.synchronize(device) if torch.cuda.is_available() else None
        elif device.type == 'cpu':
            domains = cpu_domains(rapl_root, hwmon_root)
            # RAPL counts the whole CPU: one process per machine reads it, so that the sum counts it once
            source = Rapl(domains) if int(os.environ.get('LOCAL_RANK', 0)) == 0 else Nothing()
            packages = sum(1 for label, _, _ in domains if not label.startswith('dram'))
            dram = ' and DRAM' if any(label.startswith('dram') for label, _, _ in domains) else ''
            kind = 'RAPL' if domains[0][2] is not None else 'amd_energy'
            what = (f"the CPU through {kind}: {packages} package{'s' * (packages > 1)}{dram}, the whole machine's "
                    f"(every process on it, not only this one)")
        elif device.type == 'mps':
            raise NotMeasured("Apple's MPS has no energy counter that a process can read (powermetrics needs sudo)")
        else:
            raise NotMeasured(f"no energy counter known for {device.type} devices")
    except NotMeasured as e:
        source, what = None, str(e)
    if ddp:  # the same collectives on every process: measured everywhere or nowhere
        flag = torch.tensor([0.0 if source is None else 1.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() == 0 and source is not None:
            if hasattr(source, 'close'):
                source.close()
            source, what = None, "another process cannot measure it (its first line says why)"
    if verbose:
        print(f"energy: {what}" if source is not None else f"energy not measured here: {what}")
    return Meter(source, what, ddp, device, tokens_per_step, step, kinds, sync)


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    import sys
    from configurator import fail
    if sys.argv[1:] in (['-h'], ['--help']):
        print("python energy.py [cpu|cuda|cuda:N]: what this machine measures of the device's energy, what a span "
              "costs and how often the counter moves")
        sys.exit(0)
    if len(sys.argv) > 2:
        fail("takes one argument at most, the device: cpu, cuda or cuda:N")
    try:
        device = torch.device(sys.argv[1] if len(sys.argv) > 1 else 'cuda' if torch.cuda.is_available() else 'cpu')
    except RuntimeError:
        fail(f"{sys.argv[1]!r} is not a device: cpu, cuda or cuda:N")
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail(f"{device} asked for, but this machine has no CUDA GPU: energy.py cpu")
    meter = start(device)
    # the cost of a span: median of 5 repeats of 1000 calls
    costs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(1000):
            meter.span('train')
        costs.append((time.perf_counter() - t0) / 1000 * 1e6)
    print(f"a span costs {statistics.median(costs):.3g} us (median of 5 x 1000 calls)")
    if isinstance(meter.source, (NvmlCounter, Rapl)):
        # how often the counter moves (the fork's check_usage_interval): spin on reads for a second
        source, moves, t_end = meter.source, [], time.perf_counter() + 1.0
        source.read()
        last = time.perf_counter()
        while time.perf_counter() < t_end:
            if source.read()[1]:
                now = time.perf_counter()
                moves.append(now - last)
                last = now
        if len(moves) > 2:
            print(f"the counter moved every {statistics.median(moves[1:]) * 1000:.3g} ms (median of {len(moves) - 1})")
        meter.span('train')
        time.sleep(1.0)
        print(f"idle: {meter.finish()['energy_total_j']:.4g} J over the last second")
