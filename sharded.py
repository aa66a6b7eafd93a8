"""
FSDP2 sharding (fsdp=True under torchrun) and the pieces of its checkpoints, the folders <out_dir>/ckpt_<step>/.

shard() puts each Block, then the root, under fully_shard: a rank holds 1/N of every parameter, of its gradient
and of AdamW's state, and gathers a Block's weights only while it computes. A checkpoint folder holds the tensors
as torch.distributed.checkpoint (DCP) writes them, every rank its own shards, and run.pt: the rest of what a file
checkpoint holds (step, config, data fingerprint, loop state, the optimizer's param_groups) and a CRC32 of each
DCP file. checkpoint.py names, publishes (a folder with a final name is complete), verifies, lists and prunes them.

A folder reads back on any number of ranks, each taking its part of every tensor in place (load_shards), or whole
on one process, as the very dict a file checkpoint holds (read_whole). DCP's .metadata is a pickle: it is read by
an unpickler that admits DCP's own record classes only, so a folder is as safe to open as torch.load(weights_only).
"""
import os
import pickle
import warnings
import zlib
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from checkpoint import RUN_NAME
from configurator import ConfigError



def shard(model, group, device_type, dtype):
    """Shard model over the ranks of `group` in place: each Block its own unit (its weights are gathered just for
    its forward and backward), then the root (embeddings, final LayerNorm, the head tied to the embedding)."""
    if dtype == "float16":  # GradScaler would see one rank's shard of the gradient: ranks would skip apart
        raise ConfigError("fsdp=True needs dtype bfloat16 or float32: float16's loss scaler is not sharded")
    mesh = DeviceMesh.from_group(group, device_type)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def tensors_of(state):
    """The checkpoint's tensors under flat names, as DCP writes them: model/<name>, optimizer/<index>/<key>."""
    flat = {f"model/{name}": t for name, t in state["model"].items()}
    return flat | {f"optimizer/{i}/{key}": t for i, per_param in state["optimizer"]["state"].items()
                   for key, t in per_param.items()}


@contextmanager
def unwrapped():
    """DCP reports what failed, on any rank, as a CheckpointException (a BaseException whose text is tracebacks):
    raise the first rank's failure itself instead, an OSError for a disk's, to be said as any other."""
    try:
        yield
    except CheckpointException as e:
        raise next(iter(e.failures.values()))[0] from None


def _split(flat):
    """tensors_of undone: (the model's {name: value}, the optimizer's {index: {key: value}}, by index)."""
    model, per_param = {}, {}
    for key, value in flat.items():
        if key.startswith("model/"):
            model[key.removeprefix("model/")] = value
        else:
            _, index, name = key.split("/", 2)
            per_param.setdefault(int(index), {})[name] = value
    return model, dict(sorted(per_param.items()))


def run_info(state):
    """What run.pt holds of a checkpoint: all but the tensors (the optimizer keeps its param_groups)."""
    return {k: v for k, v in state.items() if k != "model"} | {
        "optimizer": {"param_groups": state["optimizer"]["param_groups"]}}


def checksums(folder):
    """{name: CRC32} of every file in folder but run.pt; zlib.crc32 releases the GIL, as a background save needs."""
    sums = {}
    for name in sorted(os.listdir(folder)):
        if name != RUN_NAME:
            with open(os.path.join(folder, name), "rb") as f:
                crc = 0
                while chunk := f.read(1 << 24):
                    crc = zlib.crc32(chunk, crc)
            sums[name] = crc
    return sums


def missing_shards(folder):
    """The data files that DCP's .metadata names and the folder lacks: on several machines, the files of ranks
    whose out_dir is not the one rank 0 sees."""
    named = {item.relative_path for item in SafeReader(folder).read_metadata().storage_data.values()}
    return sorted(named - set(os.listdir(folder)))


def damaged(folder, info):
    """What is wrong with the folder's DCP files, measured against run.pt's record of them, or None."""
    listed, found = info.get("checksums"), checksums(folder)
    if not isinstance(listed, dict):
        return f"{RUN_NAME} records no checksums"
    missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
    if missing or extra:
        return f"{'missing ' + ', '.join(missing) if missing else 'unlisted ' + ', '.join(extra)}: files lost or added"
    bad = [name for name in listed if listed[name] != found[name]]
    if bad:
        return f"checksum mismatch in {bad[0]}: the folder is damaged"
    lost = missing_shards(folder)  # checked last: .metadata is unpickled only once it is known to be whole
    return f"missing {', '.join(lost)}, which .metadata names" if lost else None


class _Metadata(pickle.Unpickler):
    """DCP's .metadata holds dataclasses of its own, torch.Size, dtypes and a path: nothing else may load."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is no part of DCP's metadata")


class SafeReader(FileSystemReader):
    """DCP's reader of a folder, with .metadata unpickled by _Metadata (tensors load with weights_only=True)."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _Metadata(f).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def saved_tensors(folder):
    """{flat name: (shape, dtype)} of the tensors in folder."""
    entries = SafeReader(folder).read_metadata().state_dict_metadata
    return {key: (meta.size, meta.properties.dtype) for key, meta in entries.items()
            if isinstance(meta, TensorStorageMetadata)}


def read_whole(folder, info):
    """The folder as one dict on one process, without torchrun: what a file checkpoint of the same step holds."""
    flat = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in saved_tensors(folder).items()}
    with warnings.catch_warnings():  # DCP says it assumes one process: that is what no_dist asks of it
        warnings.simplefilter("ignore")
        with unwrapped():
            dcp.load(flat, storage_reader=SafeReader(folder), no_dist=True)
    state = {k: v for k, v in info.items() if k != "checksums"}
    state["model"], per_param = _split(flat)
    state["optimizer"] = {"state": per_param, **info["optimizer"]}
    return state


def _params(optimizer):
    """The optimizer's parameters by the index its state_dict gives them: in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def saved_weights(folder):
    """{name: shape} of the model's tensors in a folder, read from its .metadata alone."""
    shapes = {}
    for key, (shape, _) in saved_tensors(folder).items():
        if key.startswith("model/"):
            shapes[key.removeprefix("model/")] = shape
    return shapes


def load_shards(model, optimizer, folder, param_groups):
    """Each rank reads its part of every tensor of the folder. AdamW keeps no state before its first step, so it
    is made here in each tensor's shape first: a parameter's sharded like it, a scalar (the step count) whole."""
    params, (_, saved) = _params(optimizer), _split(saved_tensors(folder))
    state = {i: {key: torch.zeros_like(params[i]) if shape == params[i].shape else torch.zeros(shape, dtype=dtype)
                 for key, (shape, dtype) in per_param.items()} for i, per_param in saved.items()}
    # in place: the model's state_dict and these templates are the very tensors DCP fills
    into = tensors_of({"model": model.state_dict(), "optimizer": {"state": state}})
    with unwrapped():
        dcp.load(into, storage_reader=SafeReader(folder))
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def load_whole_optimizer(optimizer, whole):
    """A whole optimizer state (a file checkpoint's, read on every rank) into a sharded optimizer: each rank keeps
    its shard of every tensor shaped like its parameter."""
    params = _params(optimizer)
    state = {i: {key: distribute_tensor(t, params[i].device_mesh, params[i].placements)
                 if isinstance(params[i], DTensor) and t.shape == params[i].shape else t
                 for key, t in per_param.items()} for i, per_param in whole["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": whole["param_groups"]})
