"""Training checkpoints through Orbax: save every N steps, resume exactly, stop cleanly on SIGTERM.

    DIR/checkpoints/<step>/state/      the TrainState: params, optimizer state, step, rng
    DIR/checkpoints/<step>/data/       the data position, {"step": k}: batches are a pure
                                       function of (seed, step), so the position is the step
    DIR/checkpoints/<step>/config/     the resolved config (JSON)
    DIR/checkpoints/<step>/tokenizer/  the tokenizer (JSON)
    DIR/checkpoints/<step>/fingerprint/ checksums of the state's arrays (`fingerprint`)
    DIR/checkpoints/<step>/metrics/    {"val_loss": ...}, with checkpoint.keep_best only

Saves are asynchronous: `save` copies the arrays to host memory and returns while Orbax writes
them; a step directory appears only once complete (Orbax renames a temporary folder into
place), so a crash mid-save leaves a `*.orbax-checkpoint-tmp*` folder, which is skipped with a
warning. Restores are strict: shapes, dtypes and tree structure must match the target, or a
one-line JaxllmError names the first parameter that differs. Bytes damaged on disk after a
save are caught by the fingerprint saved with the state: a damaged step is set aside
(renamed `damaged-<step>`) with a warning, and the one before it restored.
"""

from __future__ import annotations

import pathlib
import shutil
import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxllm.errors import JaxllmError
from jaxllm.training import multihost
from jaxllm.training.step import TrainState


def _warn(message: str) -> None:
  print(f"jaxllm: warning: {message}", file=sys.stderr)


def _val_loss(metrics: dict[str, float]) -> float:
  return metrics["val_loss"]


def make_manager(directory: str | pathlib.Path,
                 checkpoint: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A CheckpointManager that saves every `every_steps` and on preemption, and keeps `keep`
  latest + `keep_best` best."""
  directory = pathlib.Path(directory).absolute()
  for leftover in sorted(directory.glob("*.orbax-checkpoint-tmp*")):
    _warn(f"skipping {leftover}: a save that did not finish (the process stopped mid-save)")
  save_when = [policies.PreemptionCheckpointingPolicy()]
  if checkpoint.every_steps > 0:
    save_when.append(policies.FixedIntervalPolicy(int(checkpoint.every_steps)))
  keep = [policies.LatestN(n=int(checkpoint.keep) if checkpoint.keep > 0 else None)]
  if checkpoint.keep_best > 0:
    # Steps saved without a validation loss (no evaluation at that step) count only as latest.
    keep.append(policies.BestN(get_metric_fn=_val_loss, reverse=True, n=int(checkpoint.keep_best),
                               keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(save_when),
      preservation_policy=policies.AnyPreservationPolicy(keep),
      # best_fn only makes Orbax write and read the metrics that BestN ranks.
      best_fn=_val_loss if checkpoint.keep_best > 0 else None, best_mode="min",
      enable_async_checkpointing=bool(checkpoint["async"]),
      cleanup_tmp_directories=True)
  # Handlers named up front, so a fresh manager can read what an earlier process saved.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "tokenizer": ocp.JsonCheckpointHandler(),
              "fingerprint": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def remove(directory: str | pathlib.Path) -> None:
  """Deletes a run's checkpoints (checkpoint.resume=false: the run starts over)."""
  shutil.rmtree(directory, ignore_errors=True)


def _storable(state: TrainState) -> TrainState:
  # Orbax stores arrays of numbers: the typed PRNG key goes in as its raw uint32 data.
  return state.replace(rng=jax.random.key_data(state.rng))


def _storable_abstract(abstract: TrainState) -> TrainState:
  rng = jax.eval_shape(jax.random.key_data, abstract.rng)
  return abstract.replace(rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                                   sharding=abstract.rng.sharding))


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> jax.Array:
  # Sums of each array's bits, plain and position-weighted, in uint32 arithmetic: exact in
  # any order, so the same on any mesh, and changed by any overwritten bytes (but for
  # chance, 1 in 2**64).
  sums = []
  for x in leaves:
    if x.dtype.itemsize >= 4:  # 8-byte numbers (float64) as two uint32 words each
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
      bits = bits.reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    sums.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),  # uint32 under JAX_ENABLE_X64 too
                           jnp.sum(bits * weights, dtype=jnp.uint32)]))
  return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> list[list[int]]:
  """Two checksums per array of `tree` (sharded or not; a collective with several hosts)."""
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x for x in jax.tree.leaves(tree)]
  return jax.device_get(_fingerprint(leaves)).tolist()


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         config: ml_collections.ConfigDict, tokenizer_json: dict,
         val_loss: float | None = None, force: bool = False) -> bool:
  """Starts saving at `step` if the policy (every_steps, preemption) or `force` says so.

  Returns whether a save started; it finishes in the background (`manager.wait_until_finished`).
  """
  if manager.latest_step() == step or not (force or manager.should_save(step)):
    return False
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(_storable(state)),
      data=ocp.args.JsonSave({"step": int(step)}),
      config=ocp.args.JsonSave(config.to_dict()),
      tokenizer=ocp.args.JsonSave(tokenizer_json),
      fingerprint=ocp.args.JsonSave({"state": fingerprint(state)}))
  metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
  return manager.save(step, args=args, metrics=metrics, force=True)


def abstract_state(create_state: Callable[[], TrainState], shardings: Any) -> TrainState:
  """The restore target: shapes and dtypes of `create_state()`, computed without running it,
  placed by `shardings` (one Sharding for all arrays, or a pytree of them like the state).

  Restoring onto it reshards: a checkpoint saved on any mesh loads onto these shardings.
  """
  return jax.eval_shape(jax.jit(create_state, out_shardings=shardings))


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shapes, dtypes and shardings of existing arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (dataclass, namedtuple), SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree: Any) -> dict[str, Any]:
  """{"params.blocks_0.attn.qkv.kernel": leaf, ...}: the names Orbax gives stored arrays."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): leaf for path, leaf in leaves}


def _path_name(path: tuple) -> str:
  return ".".join(_key_name(k) for k in path)


def check_matches(stored: Any, target: Any, what: str, fix: str) -> None:
  """Raises a one-line JaxllmError at the first array of `target` that `stored` lacks or holds
  with another shape or dtype, or at the first stored array `target` lacks.

  `stored` is Orbax's metadata tree of a saved pytree; `target` a pytree of ShapeDtypeStructs.
  Orbax alone would cast dtypes silently and name no parameter on a shape mismatch.
  """
  stored_flat, target_flat = _flat(stored), _flat(target)
  for name, want in target_flat.items():
    have = stored_flat.get(name)
    if have is None:
      raise JaxllmError(f"{what}: no '{name}', which the configured model has (shape "
                        f"{tuple(want.shape)}); {fix}")
    if tuple(have.shape) != tuple(want.shape) or str(have.dtype) != str(want.dtype):
      raise JaxllmError(f"{what}: '{name}' is {tuple(have.shape)} {have.dtype} there but "
                        f"{tuple(want.shape)} {want.dtype} in the configured model; {fix}")
  for name, have in stored_flat.items():
    if name not in target_flat:
      raise JaxllmError(f"{what}: '{name}' {tuple(have.shape)} is not in the configured model; "
                        f"{fix}")


def with_stored_floats(stored: Any, target: Any) -> Any:
  """`target` (ShapeDtypeStructs) with each floating-point leaf in the dtype `stored` (Orbax's
  metadata tree) holds it in: restore with it, then cast (float32 weights into a float64
  model)."""
  stored_flat = _flat(stored)

  def dtype_of(path, want):
    have = stored_flat.get(_path_name(path))
    if have is None or not (jnp.issubdtype(have.dtype, jnp.floating)
                            and jnp.issubdtype(want.dtype, jnp.floating)):
      return want
    return jax.ShapeDtypeStruct(want.shape, have.dtype, sharding=want.sharding)

  return jax.tree_util.tree_map_with_path(dtype_of, target)


def restore(manager: ocp.CheckpointManager, target: TrainState,
            step: int | None = None) -> tuple[TrainState, int]:
  """(state, data step) from `step`, or from the latest step that is complete and intact.

  `target` (see `abstract_state`) fixes the shapes, dtypes and shardings restored onto. A step
  that cannot be read (a crash, a full disk) is skipped with a warning for the one before it;
  one whose arrays do not match their fingerprint (damaged on disk) is also set aside; a step
  that does not match `target` is a JaxllmError, never a partial restore.
  """
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise JaxllmError(f"no checkpoint in {manager.directory} (train first, or point --workdir at "
                      f"a run directory)")
  storable = _storable_abstract(target)
  for candidate in steps:
    restored = _restore_step(manager, candidate, storable)
    if restored is not None:
      state = restored["state"]
      return (state.replace(rng=jax.random.wrap_key_data(state.rng)),
              int(restored["data"]["step"]))
  raise JaxllmError(f"no complete checkpoint in {manager.directory} (every step is damaged; "
                    f"start over with --config.checkpoint.resume=false)")


def _restore_step(manager: ocp.CheckpointManager, step: int, storable: Any) -> dict | None:
  """One step's items, or None (with a warning) if it is incomplete or damaged."""
  where = manager.directory / str(step)
  # Each process reads its own files, so each decision below is taken by all of them
  # together (multihost.everywhere): they must restore the same step or none.
  try:
    stored = manager.item_metadata(step)["state"]
    incomplete = None if stored is not None else "no metadata for 'state'"
  except Exception as e:  # Orbax raises many types for missing or truncated files
    incomplete = first_line(e)
  if not multihost.everywhere(incomplete is None):
    _warn(f"skipping checkpoint {where}: it is incomplete "
          f"({incomplete or 'on another process'})")
    return None
  check_matches(stored.tree, storable, f"checkpoint {where}",
                "set the model config to the one in its config/ (or start over with "
                "--config.checkpoint.resume=false)")
  items = {"state": ocp.args.StandardRestore(storable), "data": ocp.args.JsonRestore()}
  if (where / "fingerprint").is_dir():
    items["fingerprint"] = ocp.args.JsonRestore()
  try:
    restored, reason = _read_alone(where, items), None
  except Exception as e:
    restored, reason = None, f"it cannot be read: {first_line(e)}"
  if not multihost.everywhere(reason is None):
    reason = reason or "another process cannot read it"
  elif ("fingerprint" in restored  # of the global arrays: the same answer on every process
        and fingerprint(restored["state"]) != restored["fingerprint"]["state"]):
    reason = "its arrays do not match the fingerprint saved with them"
  else:
    return restored
  _warn(f"skipping checkpoint {where}: {reason}; moved to damaged-{step}")
  if jax.process_index() == 0:
    where.rename(where.with_name(f"damaged-{step}"))  # later saves may reuse the step
  multihost.sync(f"jaxllm: checkpoint {step} set aside")
  manager.reload()
  return None


def _read_alone(where: pathlib.Path, items: dict[str, Any]) -> dict[str, Any]:
  """Reads one step's `items` with no barrier between processes.

  Orbax's restore ends at a barrier of every process: one whose read fails skips it, and
  its next collective (the agreement in `_restore_step`) would meet the others' barrier
  instead. Each process reads its own shards anyway; agreeing is `_restore_step`'s job.
  """
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  restored = {}
  for name, args in items.items():
    handler = (ocp.StandardCheckpointHandler if name == "state"
               else ocp.JsonCheckpointHandler)(multiprocessing_options=alone)
    with ocp.Checkpointer(handler, multiprocessing_options=alone) as reader:
      restored[name] = reader.restore(where / name, args=args)
  return restored


def first_line(error: Exception) -> str:
  """An error message cut to one line, for messages that must stay one line."""
  text = str(error).strip()
  return (text.splitlines() or [type(error).__name__])[0][:200]


class PreemptionWatch:
  """Notices a preemption so the loop can save at the next step boundary and stop.

  One process: SIGTERM (what schedulers send before killing). Several processes: Orbax's
  preemption sync point (`manager.reached_preemption`), where JAX's distributed runtime
  handles the signal and agrees on one step for all hosts.
  """

  def __init__(self):
    self.signal_received = False
    self._previous = None

  def __enter__(self) -> "PreemptionWatch":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def _on_signal(self, signum, frame) -> None:
    self.signal_received = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, manager: ocp.CheckpointManager, step: int) -> str | None:
    """Why to stop after `step` ("SIGTERM", "preemption sync point"), or None to go on."""
    if self.signal_received:
      return "SIGTERM"
    if manager.reached_preemption(step):
      return "preemption sync point"
    return None
