"""Telemetry: Prometheus metrics (vLLM's names where they exist, `hearth_*` for ours), and the GPU
(nvidia-ml-py) and host (psutil) samplers that the metrics and the UI read.

Engine state (queues, KV blocks, token counters) is read from `engine.snapshot()` at scrape time, so
the numbers are never stale and the engine thread does no metrics work. Latency histograms are fed
by the AsyncEngine through the `RequestObserver` methods below. Each Telemetry has its own registry:
two servers in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from hearth.appliance.request_stream import FinishedRequest

logger = logging.getLogger("hearth.telemetry")

NO_GPU = "no NVIDIA GPU"
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
# vLLM turns the `*_created` series off too; dashboards do not use them.
disable_created_metrics()
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization: float  # 0..1
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None
    power_w: float | None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None


@dataclass(frozen=True)
class HostSample:
    cpu_utilization: float  # 0..1, all cores
    memory_used_bytes: int
    memory_total_bytes: int
    process_rss_bytes: int


def engine_gpu_indices(devices: str, visible: str | None = None) -> list[int]:
    """NVML indices of the cards in an engine's device text ("cuda:1", "cuda:0, cuda:1", "cpu").

    CUDA numbers the cards CUDA_VISIBLE_DEVICES lets it see (`visible`, the variable's value);
    `hearth serve` sets CUDA_DEVICE_ORDER=PCI_BUS_ID unless told otherwise, so CUDA's order is
    NVML's. Cards named by UUID in CUDA_VISIBLE_DEVICES cannot be mapped here and are left out."""
    indices = []
    for device in (d.strip() for d in devices.split(",")):
        if not device.startswith("cuda"):
            continue
        index = int(device.partition(":")[2] or 0)
        if visible is None or not visible.strip():
            indices.append(index)
            continue
        entries = [e.strip() for e in visible.split(",")]
        if index < len(entries) and entries[index].isdigit():
            indices.append(int(entries[index]))
    return indices


class GpuSampler:
    """NVML readings per GPU; `status` says "no NVIDIA GPU" (and sample() is empty) without one."""

    def __init__(self) -> None:
        self.status = NO_GPU
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
            self.status = f"{count} NVIDIA GPU(s)" if count else NO_GPU
        except Exception as error:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
            logger.info("%s (%s)", NO_GPU, type(error).__name__)

    @property
    def num_gpus(self) -> int:
        """NVIDIA GPUs NVML sees (all of them: it ignores CUDA_VISIBLE_DEVICES)."""
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        samples = []
        for index, handle in enumerate(self._handles):
            try:
                samples.append(self._read(index, handle))
            except Exception as error:  # noqa: BLE001 - a GPU fell off the bus: report, go on
                self.status = f"NVML error on GPU {index}: {error}"
        return samples

    def _read(self, index: int, handle: Any) -> GpuSample:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        return GpuSample(
            index=index,
            name=name.decode() if isinstance(name, bytes) else name,
            utilization=nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            temperature_c=_optional(lambda: nvml.nvmlDeviceGetTemperature(handle, 0)),
            power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
            sm_clock_mhz=_optional(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            memory_clock_mhz=_optional(
                lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)
            ),
        )

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml, self._handles = None, []


def _optional(read: Callable[[], float]) -> float | None:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - not every GPU reports temperature or power
        return None


class HostSampler:
    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def sample(self) -> HostSample:
        memory = psutil.virtual_memory()
        return HostSample(
            cpu_utilization=psutil.cpu_percent(interval=None) / 100,
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            process_rss_bytes=int(self._process.memory_info().rss),
        )


class Telemetry:
    """The metrics registry, and the RequestObserver that feeds its histograms."""

    def __init__(self, snapshot: Callable[[], Any], status: Callable[[], dict[str, float]]) -> None:
        self.model_name = ""
        self.registry = CollectorRegistry()
        self.gpu = GpuSampler()
        self.host = HostSampler()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self._ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self._itl = histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS
        )
        self._itl_for: tuple[str | None, Any] = (None, None)  # (model name, its ITL child)
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Request latency.", _LATENCY_BUCKETS
        )
        self._prompt = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self._generation = histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS
        )
        self._success = Counter(
            "vllm:request_success",
            "Finished requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "hearth_requests_rejected", "Requests refused with 429.", labels, registry=self.registry
        )
        self.registry.register(_StateCollector(self, snapshot, status))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.labels(self.model_name).observe(ttft_s)

    def on_token_gap(self, itl_s: float) -> None:
        # Once per token of every stream: the labelled child is looked up once per model name.
        if self._itl_for[0] != self.model_name:
            self._itl_for = (self.model_name, self._itl.labels(self.model_name))
        self._itl_for[1].observe(itl_s)

    def on_finished(self, request: FinishedRequest) -> None:
        self._e2e.labels(self.model_name).observe(request.e2e_s)
        self._prompt.labels(self.model_name).observe(request.num_prompt_tokens)
        self._generation.labels(self.model_name).observe(request.num_generation_tokens)
        self._success.labels(self.model_name, request.finish_reason).inc()

    def on_rejected(self) -> None:
        self._rejected.labels(self.model_name).inc()

    def close(self) -> None:
        self.gpu.close()


class _StateCollector:
    """Gauges and counters read at scrape time: engine snapshot, server status, GPU, host."""

    def __init__(
        self,
        telemetry: Telemetry,
        snapshot: Callable[[], Any],
        status: Callable[[], dict[str, float]],
    ) -> None:
        self._telemetry = telemetry
        self._snapshot = snapshot
        self._status = status

    def collect(self) -> Iterator[Metric]:
        yield from self._server_metrics()
        snapshot = self._snapshot()
        if snapshot is not None:
            yield from self._engine_metrics(snapshot)
        yield from self._gpu_metrics()
        yield from self._host_metrics()

    def _server_metrics(self) -> Iterator[Metric]:
        for name, value in self._status().items():
            yield GaugeMetricFamily(f"hearth_{name}", f"Server status: {name}.", value=value)

    def _engine_metrics(self, snap: Any) -> Iterator[Metric]:
        model = [self._telemetry.model_name]

        def gauge(name: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        sched, blocks = snap.scheduler, snap.blocks
        yield gauge("vllm:num_requests_running", "Sequences running.", sched.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting.", sched.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", blocks.usage)
        yield counter("vllm:prompt_tokens", "Prompt tokens.", snap.num_prompt_tokens_total)
        yield counter(
            "vllm:generation_tokens", "Generated tokens.", snap.num_generation_tokens_total
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            blocks.prefix_queries_tokens,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            blocks.prefix_hits_tokens,
        )
        yield counter("vllm:num_preemptions", "Preemptions.", sched.num_preemptions)
        family = GaugeMetricFamily(
            "hearth_kv_cache_blocks", "KV-cache blocks by state.", labels=["state"]
        )
        for state, value in (
            ("total", blocks.num_blocks),
            ("used", blocks.num_used),
            ("free", blocks.num_free),
            ("cached", blocks.num_cached),
        ):
            family.add_metric([state], value)
        yield family
        spec = snap.spec_decode
        if spec is not None:
            yield from _spec_decode_metrics(spec, model)
        replicas = snap.replicas
        if replicas:
            yield from _replica_metrics(replicas)

    def _gpu_metrics(self) -> Iterator[Metric]:
        samples = self._telemetry.gpu.sample()
        fields = (
            ("utilization_ratio", "utilization"),
            ("memory_used_bytes", "memory_used_bytes"),
            ("memory_total_bytes", "memory_total_bytes"),
            ("temperature_celsius", "temperature_c"),
            ("power_watts", "power_w"),
        )
        yield GaugeMetricFamily(
            "hearth_gpu_count", "NVIDIA GPUs visible to NVML.", value=len(samples)
        )
        for metric, attribute in fields:
            family = GaugeMetricFamily(f"hearth_gpu_{metric}", f"GPU {metric}.", labels=["gpu"])
            for sample in samples:
                value = getattr(sample, attribute)
                if value is not None:
                    family.add_metric([str(sample.index)], value)
            yield family

    def _host_metrics(self) -> Iterator[Metric]:
        host = self._telemetry.host.sample()
        yield GaugeMetricFamily(
            "hearth_host_cpu_utilization_ratio",
            "Host CPU use, all cores.",
            value=host.cpu_utilization,
        )
        yield GaugeMetricFamily(
            "hearth_host_memory_used_bytes", "Host memory in use.", value=host.memory_used_bytes
        )
        yield GaugeMetricFamily(
            "hearth_host_memory_total_bytes", "Host memory.", value=host.memory_total_bytes
        )


def _spec_decode_metrics(spec: Any, model: list[str]) -> Iterator[Metric]:
    """Speculative decoding under vLLM's metric names (engine/speculative/stats.py)."""
    for name, doc, value in (
        ("vllm:spec_decode_num_drafts", "Proposals verified.", spec.num_drafts),
        ("vllm:spec_decode_num_draft_tokens", "Tokens proposed.", spec.num_draft_tokens),
        ("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
         spec.num_accepted_tokens),
    ):
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(model, value)
        yield family
    family = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                 "Proposed tokens accepted, by position in the proposal.",
                                 labels=["model_name", "position"])
    for position, value in enumerate(spec.accepted_per_pos):
        family.add_metric([*model, str(position)], value)
    yield family


def _replica_metrics(replicas: tuple) -> Iterator[Metric]:
    """Data parallelism: each replica's queues, KV blocks and tokens, labelled by replica and
    device (the vllm:* series above sum or show replica 0)."""
    labels = ["replica", "device"]
    rows = (
        ("hearth_replica_requests_running", "Sequences running, per replica.", GaugeMetricFamily,
         lambda s: s.scheduler.num_running),
        ("hearth_replica_requests_waiting", "Sequences waiting, per replica.", GaugeMetricFamily,
         lambda s: s.scheduler.num_waiting),
        ("hearth_replica_kv_cache_usage_perc", "KV-cache usage per replica (1 = full).",
         GaugeMetricFamily, lambda s: s.blocks.usage),
        ("hearth_replica_kv_cache_blocks_total", "KV-cache blocks per replica.",
         GaugeMetricFamily, lambda s: s.blocks.num_blocks),
        ("hearth_replica_prompt_tokens", "Prompt tokens per replica.", CounterMetricFamily,
         lambda s: s.num_prompt_tokens_total),
        ("hearth_replica_generation_tokens", "Generated tokens per replica.", CounterMetricFamily,
         lambda s: s.num_generation_tokens_total),
        ("hearth_replica_prefix_cache_hits", "Prompt tokens found in each replica's prefix "
         "cache.", CounterMetricFamily, lambda s: s.blocks.prefix_hits_tokens),
    )
    for name, doc, kind, value in rows:
        family = kind(name, doc, labels=labels)
        for index, replica in enumerate(replicas):
            family.add_metric([str(index), replica.device], value(replica))
        yield family
