"""The scheduler the Executor calls each step: admission, placement, split, preemption.

Use from the Executor's step loop::

    sched = Scheduler(SchedulerConfig(max_num_seqs=256), nodes, gpu=gpu_model)
    sched.add_request(seq_id, prompt_len, max_tokens)      # on each new request
    plan = sched.schedule()                                # once per step, before running it
    #   free plan.preempted KV; prefill plan.admitted on their node_id;
    #   decode plan.minibatches[0] and [1] in the two-stage pipeline
    sched.on_tokens(seq_ids_that_got_a_token)              # after the step's sampling (and prefills')
    sched.on_finished(seq_id)                              # after its last token was counted
    sched.observe_attend_calls(calls)                      # the step's attend calls (start, end)
    sched.observe_dense(batch, seconds)                    # measured dense steps

Pure logic: plain numbers in, typed decisions out, deterministic.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping

from fastdecode.scheduler.admission import AdmissionPolicy, StepPredictor
from fastdecode.scheduler.attend_calls import AttendCall, service_times
from fastdecode.scheduler.config import SchedulerConfig
from fastdecode.scheduler.decisions import Admission, Preemption, StepPlan
from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import GpuPerfModel
from fastdecode.scheduler.placement import NodeLoad, can_ever_fit, check_lengths, choose_node, reserved_output_limit
from fastdecode.scheduler.preemption import Resident, choose_victims, youngest
from fastdecode.scheduler.sequences import SequenceRecord, SequenceTable
from fastdecode.scheduler.split import SplitItem, StepTimeModel, split_minibatches
from fastdecode.scheduler.step_model import DecodeStepModel, MiniBatchLoad

MESSAGE_OVERHEAD_RATE = 0.05  # EWMA rate of the per-message cost (the first samples weigh alike)


class NoNodeFitsError(ValueError):
    """A request well-formed, within the context length, that no node there now could hold even empty (the ones
    that could are away)."""


class Scheduler:
    """Owns the sequence bookkeeping; decides each step from the node and GPU models."""

    def __init__(self, config: SchedulerConfig, nodes: Iterable[NodeModel], gpu: GpuPerfModel | None = None, *,
                 is_pipelined: bool = True) -> None:
        self.config = config
        self.is_pipelined = is_pipelined  # False: the Executor runs a step's mini-batches merged, as one
        self.gpu = gpu
        self._nodes: dict[int, NodeModel] = {}
        self._closed: set[int] = set()  # nodes that keep their sequences but take no new one (close_node)
        for node in nodes:
            self.add_node(node)
        if not self._nodes:
            raise ValueError("the scheduler needs at least one node")
        num_layers = next(iter(self._nodes.values())).num_layers
        self.step_model = DecodeStepModel(self._nodes, num_layers, gpu.predict if gpu else None)
        self.message_overhead_s = 0.0  # mean per-message cost of attend calls over the calibration
        self._num_message_samples = 0
        self._table = SequenceTable()
        self._admission = AdmissionPolicy(config)
        self._num_steps = 0

    # --- nodes ---------------------------------------------------------------------
    @property
    def nodes(self) -> dict[int, NodeModel]:
        return dict(self._nodes)

    def add_node(self, node: NodeModel) -> None:
        if node.node_id in self._nodes:
            raise ValueError(f"node {node.node_id} is already registered")
        self._check_layers(node)
        self._nodes[node.node_id] = node

    def replace_node(self, node: NodeModel) -> list[Preemption]:
        """A registered node came back as a new instance (the last node is never removed while it is away): its
        model is the new one (capacity, page size and speed may differ), it takes new sequences again, and the
        sequences still placed on it are requeued with their progress (their KV went with the old instance)."""
        if node.node_id not in self._nodes:
            raise KeyError(f"unknown node {node.node_id}")
        self._check_layers(node)
        preempted = self._requeue_node(node.node_id)
        self._nodes[node.node_id] = node
        self._closed.discard(node.node_id)
        return preempted

    def _check_layers(self, node: NodeModel) -> None:
        layers = {n.num_layers for n in self._nodes.values()}
        if layers and node.num_layers not in layers:
            raise ValueError(f"node {node.node_id} has {node.num_layers} layers, the others {layers.pop()}")

    def close_node(self, node_id: int) -> None:
        """Place no new sequence on ``node_id``; the ones it holds run on (a draining node kept serving them).
        It stays closed until it is removed or replaced."""
        if node_id not in self._nodes:
            raise KeyError(f"unknown node {node_id}")
        self._closed.add(node_id)

    def remove_node(self, node_id: int) -> list[Preemption]:
        """Take a node away (it died or is drained): its sequences are requeued with their progress."""
        if node_id not in self._nodes:
            raise KeyError(f"unknown node {node_id}")
        if len(self._nodes) == 1:
            raise ValueError("cannot remove the last node")
        preempted = self._requeue_node(node_id)
        del self._nodes[node_id]
        self._closed.discard(node_id)
        return preempted

    def _requeue_node(self, node_id: int) -> list[Preemption]:
        """Every sequence running on ``node_id`` back to the queue, in id order."""
        return [self._preempt(seq_id) for seq_id in sorted(r.seq_id for r in self._table.running()
                                                           if r.node_id == node_id)]

    def node_loads(self) -> dict[int, NodeLoad]:
        return self._table.node_loads(self._nodes, self.config.max_reserved_output)

    def stranded(self) -> list[int]:
        """Waiting sequences that no node now could hold even empty (the one that could was removed): ids."""
        return [r.seq_id for r in self._table.waiting() if not can_ever_fit(self._nodes.values(), r.expected_final_len)]

    def can_relieve(self, node_ids: Iterable[int], onto: Iterable[int]) -> bool:
        """Whether the open nodes among ``onto`` have room now for every sequence running on ``node_ids`` (say they
        drain), on top of what they hold, each placed in arrival order as admission would place it."""
        leaving = set(node_ids)
        targets = set(onto) - leaving - self._closed
        loads = {i: load for i, load in self.node_loads().items() if i in targets}
        records = sorted((r for r in self._table.running() if r.node_id in leaving), key=lambda r: r.arrival_index)
        limits = self._reserved_output_limits()
        return all(self._place(record, loads, limits) is not None for record in records)

    # --- requests ------------------------------------------------------------------
    @property
    def admission(self) -> AdmissionPolicy:
        return self._admission

    @property
    def num_waiting(self) -> int:
        return self._table.num_waiting

    @property
    def num_running(self) -> int:
        return self._table.num_running

    def sequence(self, seq_id: int) -> SequenceRecord:
        """A copy of a sequence's scheduling state."""
        return dataclasses.replace(self._table.get(seq_id))

    def add_request(self, seq_id: int, prompt_len: int, max_tokens: int) -> None:
        """Queue a new sequence; ValueError if it is malformed, NoNodeFitsError if no node now could hold it."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        check_lengths(prompt_len, prompt_len + max_tokens)
        if not can_ever_fit(self._nodes.values(), prompt_len + max_tokens):
            raise NoNodeFitsError(
                f"sequence {seq_id} needs {prompt_len + max_tokens} tokens of KV-cache, more than any node holds"
            )
        self._table.add(seq_id, prompt_len, max_tokens)
        self._admission.on_arrival(prompt_len, max_tokens)

    def abort(self, seq_id: int) -> bool:
        """Forget a waiting or running sequence (the caller frees its KV). False if unknown."""
        if seq_id not in self._table:
            return False
        self._table.remove(seq_id)
        return True

    def on_tokens(self, seq_ids: Iterable[int]) -> None:
        """Each of ``seq_ids`` (running) got one more token."""
        records = [self._table.get(seq_id) for seq_id in seq_ids]
        for record in records:
            if not record.is_running:
                raise ValueError(f"sequence {record.seq_id} is not running")
            if record.num_generated >= record.max_tokens:
                raise ValueError(f"sequence {record.seq_id} already has its {record.max_tokens} tokens")
        for record in records:
            record.num_generated += 1

    def on_finished(self, seq_id: int) -> None:
        """A sequence ended (EOS, stop or max_tokens): forget it and re-plan admission."""
        record = self._table.remove(seq_id)
        self._admission.on_finish(record.num_generated, record.max_tokens)

    def preempt(self, seq_id: int) -> Preemption:
        """Requeue a running sequence whose KV its node could not keep (it refused the sequence's attend):
        the caller frees what is left of it; it is admitted and rebuilt again like any preempted one."""
        if not self._table.get(seq_id).is_running:
            raise ValueError(f"sequence {seq_id} is not running")
        return self._preempt(seq_id)

    def on_out_of_memory(self, node_id: int) -> Preemption | None:
        """A node reported it cannot allocate: preempt its youngest sequence (None if it runs none)."""
        if node_id not in self._nodes:
            raise KeyError(f"unknown node {node_id}")
        victim = youngest(self._residents(node_id))
        return None if victim is None else self._preempt(victim.seq_id)

    # --- measurements --------------------------------------------------------------
    def observe_attend(self, node_id: int, kv_bytes: float, seconds: float) -> float:
        """Feed a measured attend call (a round trip as the Executor sees it) to the node's model;
        returns the prediction's relative error.

        The call's excess over the node's calibration (the bare native call) is the per-message
        cost: wire, queueing, message handling.  Its running mean over every node is what a node
        not measured yet is predicted to pay on top of its calibration, so placement does not
        favour a node merely because its cost has not been seen yet.
        """
        perf = self._nodes[node_id].perf
        observe = getattr(perf, "observe", None)
        if observe is None:
            raise TypeError(f"node {node_id}'s time model does not learn from measurements")
        error = observe(kv_bytes, seconds)
        calibrated = getattr(perf, "predict_calibrated", None)
        if calibrated is not None:
            self._num_message_samples += 1
            rate = max(MESSAGE_OVERHEAD_RATE, 1.0 / self._num_message_samples)
            excess = max(0.0, seconds - calibrated(kv_bytes))
            self.message_overhead_s += rate * (excess - self.message_overhead_s)
            for node in self._nodes.values():
                if hasattr(node.perf, "unmeasured_overhead_s"):
                    node.perf.unmeasured_overhead_s = self.message_overhead_s
        return error

    def observe_attend_calls(self, calls: Iterable[AttendCall]) -> list[float]:
        """Feed one step's measured attend calls, each with its start and end on the caller's clock.

        A call that overlapped an earlier one on its node counts only from that call's end
        (``attend_calls.service_times``): the step model queues calls on a node itself, so the
        node's model learns its service time, not the wait for the other mini-batch.  Returns
        each call's prediction error, in the order the calls were fed (by node, by end).
        """
        return [self.observe_attend(call.node_id, call.kv_bytes, seconds) for call, seconds in service_times(calls)]

    def observe_dense(self, batch: int, seconds: float) -> float:
        if self.gpu is None:
            raise ValueError("no GPU model to update")
        return self.gpu.observe(batch, seconds)

    def predict_decode_s(self, minibatches: Iterable[Iterable[int]]) -> float:
        """Predicted seconds of a decode step running these groups of running seq ids (one, or two
        concurrently), as the Executor measures it: its dense calls and attend round trips."""
        return self.step_model.predict(self._loads(minibatches))

    def predict_unplaced_step_s(self, num_seqs: int, context_by_node: Mapping[int | None, float]) -> float:
        """Predicted seconds of a decode step of ``num_seqs`` sequences holding ``context_by_node`` tokens, those
        under None not placed yet: spread evenly over the nodes open for new sequences (placement evens their attend
        times, so for like nodes this is where it leads; a slower node gets an even share, which over-rates the
        step). Split as the Executor runs it: one mini-batch without the pipeline, else two halves or one. What SLS
        admission weighs a peak load with."""
        open_ids = self._open_node_ids()
        context = {i: float(context_by_node.get(i, 0.0)) for i in self._nodes}
        for i in open_ids:
            context[i] += context_by_node.get(None, 0.0) / len(open_ids)
        if not self.is_pipelined:
            return self.step_model.predict([MiniBatchLoad(num_seqs, context)]) if num_seqs else 0.0
        return self.step_model.predict_unsplit(num_seqs, context,
                                               is_single_allowed=self.config.is_single_minibatch_allowed)

    def _step_predictor(self) -> StepPredictor | None:
        """``predict_unplaced_step_s`` where it weighs context: not where every open node is timed by a whole-step
        model (the GPU KV node's CUDA graphs), which ignores it (then SLS paces as it would with no model)."""
        if all(self._nodes[i].whole_step is not None for i in self._open_node_ids()):
            return None
        return self.predict_unplaced_step_s

    def _open_node_ids(self) -> list[int]:
        """The nodes that take new sequences (all of them where every one is closed: one must be counted)."""
        return [i for i in self._nodes if i not in self._closed] or list(self._nodes)

    def observe_decode(self, minibatches: Iterable[Iterable[int]], seconds: float, *,
                       is_device_time_included: bool = True) -> float:
        """Feed a measured decode step of these groups (as run); returns the prediction's relative error.
        ``is_device_time_included=False`` when the time may end before the device's work did (see
        ``DecodeStepModel.observe``)."""
        return self.step_model.observe(self._loads(minibatches), seconds,
                                       is_device_time_included=is_device_time_included)

    def _loads(self, minibatches: Iterable[Iterable[int]]) -> list[MiniBatchLoad]:
        loads = []
        for group in minibatches:
            records = [self._table.get(seq_id) for seq_id in group]
            context: dict[int, int] = {}
            for record in records:
                if not record.is_running:
                    raise ValueError(f"sequence {record.seq_id} is not running")
                context[record.node_id] = context.get(record.node_id, 0) + record.context_len
            loads.append(MiniBatchLoad(len(records), context))
        return [load for load in loads if load.num_seqs]

    # --- the step ------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Decide the coming step: preemptions, admissions and the two mini-batches."""
        self._num_steps += 1
        preempted = [self._preempt(seq_id) for seq_id in self._overflowing()]
        admitted_ids = self._admit()
        running = list(self._table.running())
        items = [SplitItem(r.seq_id, r.node_id, r.context_len, r.minibatch) for r in running]
        step_model = StepTimeModel(self._nodes, self.step_model.num_layers, self.step_model.dense_step_s)
        assignment, step_s = split_minibatches(items, step_model, self.config.rebalance_threshold,
                                               is_single_allowed=self.config.is_single_minibatch_allowed)
        halves: tuple[list[int], list[int]] = ([], [])
        for record in running:
            record.minibatch = assignment[record.seq_id]
            halves[record.minibatch].append(record.seq_id)
        admitted = tuple(
            Admission(r.seq_id, r.node_id, r.minibatch, r.prefill_len, r.num_generated)
            for r in (self._table.get(i) for i in admitted_ids)
        )
        minibatches = (tuple(sorted(halves[0])), tuple(sorted(halves[1])))
        return StepPlan(
            step_index=self._num_steps,
            preempted=tuple(preempted),
            admitted=admitted,
            minibatches=minibatches,
            predicted_step_s=step_s,
            total_context=sum(item.context_len for item in items),
        )

    def _residents(self, node_id: int) -> list[Resident]:
        node = self._nodes[node_id]
        return [
            Resident(r.seq_id, r.arrival_index, node.pages_for(r.context_len))
            for r in self._table.running()
            if r.node_id == node_id
        ]

    def _overflowing(self) -> list[int]:
        """Victims on every node whose residents need more pages for the coming step than it has."""
        loads = self._table.node_loads(self._nodes)
        victims: list[int] = []
        for node_id in sorted(self._nodes):
            if loads[node_id].num_used_pages > self._nodes[node_id].num_pages:
                victims += choose_victims(self._residents(node_id), self._nodes[node_id].num_pages)
        return victims

    def _preempt(self, seq_id: int) -> Preemption:
        node_id = self._table.get(seq_id).node_id
        record = self._table.requeue(seq_id)
        return Preemption(seq_id, node_id, record.num_generated)

    def _admit(self) -> list[int]:
        running = list(self._table.running())
        if len(running) >= self.config.max_num_seqs:
            # No free slot: nothing to admit, whatever waits (the queue may hold thousands: it is not read). The
            # policy is still asked, with no candidate, as every step, for its pacing (SLS's credit).
            self._admission.num_to_admit(running, [])
            return []
        # A sequence no node left could hold even empty (the one that could was removed: the Executor ends it,
        # ``stranded``) does not hold the queue behind it; the others keep first come, first served.
        waiting = [r for r in self._table.waiting() if can_ever_fit(self._nodes.values(), r.expected_final_len)]
        num = self._admission.num_to_admit(running, waiting, self._step_predictor())
        if num == 0:
            return []
        loads = {i: load for i, load in self.node_loads().items() if i not in self._closed}
        limits = self._reserved_output_limits()
        admitted: list[int] = []
        for record in waiting[:num]:
            node_id = self._place(record, loads, limits)
            if node_id is None:
                break  # first come, first served: the head waits for room
            self._table.start(record.seq_id, node_id, self._num_steps)
            admitted.append(record.seq_id)
        self._admission.on_admitted(waiting[:len(admitted)])  # admission stops at the first that finds no room
        return admitted

    def _reserved_output_limits(self) -> dict[int, int | None]:
        return {i: reserved_output_limit(node, self.config.max_reserved_output) for i, node in self._nodes.items()}

    def _place(self, record: SequenceRecord, loads: dict[int, NodeLoad], limits: dict[int, int | None]) -> int | None:
        """The node of ``loads`` that ``record`` would start on (None: none has room), its load counted there.
        ``limits``: each node's ``reserved_output_limit``."""
        reserved_lens = {i: record.reserved_final_len(limit) for i, limit in limits.items()}
        node_id = choose_node(loads.values(), record.context_len, reserved_lens, overcommit=self.config.overcommit)
        if node_id is not None:
            node, load = self._nodes[node_id], loads[node_id]
            loads[node_id] = NodeLoad(
                node,
                load.num_used_pages + node.pages_for(record.context_len + 1),
                load.num_committed_pages + node.pages_for(reserved_lens[node_id]),
                load.num_final_tokens + reserved_lens[node_id],
            )
        return node_id
