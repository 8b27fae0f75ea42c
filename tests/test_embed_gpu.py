"""``packvit embed`` on CUDA: the side-stream copies in, the pinned non-blocking copies out and the
writer thread's wait on their event give the rows and embeddings of the CPU run; and the GPU route
(``--decode gpu``: nvJPEG in batches, the EXIF orientation and the processor's device path on the
GPU) against the CPU route: pixels, pooled embeddings of a full-size so400m, rows, throughput."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from figures import report
from packvit.benchmarks.workloads import write_files
from packvit.embed import embed
from packvit.embed.dataset import make_loader
from packvit.embed.decode import DecodeOptions
from packvit.embed.gpu_decode import JpegDecoder, gpu_decode_unavailable, nvjpeg_decode, read_header, upright
from packvit.embed.model import describe_checkpoint, load_encoder
from packvit.embed.preprocess import ProcessorSpec
from packvit.embed.sources import plan_inputs
from test_embed_support import FOLDER_BAD, GOOD, MAX_NUM_PATCHES, random_checkpoint, read_output, write_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("pyarrow")
RUN = dict(max_num_patches=MAX_NUM_PATCHES, token_budget=4 * MAX_NUM_PATCHES, shard_size=5, dtype="float32", quiet=True,
           save_tokens=True, layers=(-1, 0))
#: the baseline JPEGs of the embed test folder (``write_image_folder``): the GPU route's files there
FOLDER_JPEGS = 4
NUM_FILES = 512


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _needs_nvjpeg() -> None:
    reason = gpu_decode_unavailable(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """The ``files`` benchmark's JPEGs (scikit-image photographs, 200-2,000 px, quality 90)."""
    pytest.importorskip("skimage")
    return write_files(tmp_path_factory.mktemp("files"), NUM_FILES, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cuda_run_writes_what_the_cpu_run_writes(tmp_path, workers):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    embed(checkpoint, images, tmp_path / "cpu", device="cpu", workers=0, **RUN)
    summary = embed(checkpoint, images, tmp_path / "cuda", device="cuda", model_dtype="float32", workers=workers,
                    decode="cpu", **RUN)
    assert summary.stats.workers == workers and summary.ok == len(GOOD) and summary.failed == len(FOLDER_BAD)
    cpu_rows, cpu = read_output(tmp_path / "cpu")
    cuda_rows, cuda = read_output(tmp_path / "cuda")
    assert cuda_rows == cpu_rows
    ok = np.array([row["status"] == "ok" for row in cpu_rows])
    assert _cosine(cuda[ok], cpu[ok]).min() > 0.9999 and not cuda[~ok].any()
    for shard in sorted({row["shard"] for row in cpu_rows}):
        on_cpu = load_file(str(tmp_path / "cpu" / "tokens" / f"tokens_{shard}.safetensors"))
        on_cuda = load_file(str(tmp_path / "cuda" / "tokens" / f"tokens_{shard}.safetensors"))
        assert sorted(on_cuda) == sorted(on_cpu)
        np.testing.assert_array_equal(on_cuda["offsets"], on_cpu["offsets"])
        for name in ("hidden_states.-1", "hidden_states.0"):
            assert _cosine(on_cuda[name], on_cpu[name]).min() > 0.999, (shard, name)


def test_the_default_cuda_run_in_bfloat16_keeps_the_rows_and_directions(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    embed(checkpoint, images, tmp_path / "cpu", device="cpu", workers=0, max_num_patches=MAX_NUM_PATCHES, quiet=True)
    embed(checkpoint, images, tmp_path / "cuda", max_num_patches=MAX_NUM_PATCHES, quiet=True)
    cpu_rows, cpu = read_output(tmp_path / "cpu")
    cuda_rows, cuda = read_output(tmp_path / "cuda")
    assert cuda_rows == cpu_rows and cuda.dtype == np.float16
    ok = np.array([row["status"] == "ok" for row in cpu_rows])
    np.testing.assert_allclose(np.linalg.norm(cuda[ok].astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert _cosine(cuda[ok].astype(np.float32), cpu[ok].astype(np.float32)).min() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_workers_uint8_normalised_on_the_gpu_is_the_processors_output_bit_for_bit(tmp_path, dtype):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    spec = ProcessorSpec(str(checkpoint), "siglip2", True, MAX_NUM_PATCHES)
    processor = spec.build()
    encoder = load_encoder(describe_checkpoint(str(checkpoint)), processor, device="cuda", dtype=dtype)
    checked = 0
    for pack in make_loader(plan_inputs(str(images)).tasks, spec, 4 * MAX_NUM_PATCHES, DecodeOptions(), 2,
                            torch.device("cuda")):
        files = [result.rows[0].image_path for result in pack.inputs if result.ok_rows]
        if not files:
            continue
        batch = encoder.pack_batch(pack)
        expected = processor(images=files).patches.to(dtype)  # normalised on the CPU, as the workers did before
        assert batch.patches.dtype == dtype and torch.equal(batch.patches.cpu(), expected), files
        checked += len(files)
    assert checked == len(GOOD)


def test_auto_decodes_jpegs_on_the_gpu_and_keeps_every_row(tmp_path):
    _needs_nvjpeg()
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    cpu = embed(checkpoint, images, tmp_path / "cpu", decode="cpu", workers=2, **RUN)
    auto = embed(checkpoint, images, tmp_path / "auto", workers=2, **RUN)
    assert auto.stats.decode == "gpu" and auto.stats.gpu_decoded == FOLDER_JPEGS and auto.stats.gpu_fallbacks == 0
    assert (auto.ok, auto.failed, auto.by_status) == (cpu.ok, cpu.failed, cpu.by_status)
    cpu_rows, cpu_embeddings = read_output(tmp_path / "cpu")
    auto_rows, auto_embeddings = read_output(tmp_path / "auto")
    assert auto_rows == cpu_rows, "no input lost: every row, status and grid as the CPU route gives them"
    ok = np.array([row["status"] == "ok" for row in cpu_rows])
    cosine = _cosine(auto_embeddings[ok].astype(np.float32), cpu_embeddings[ok].astype(np.float32))
    report({"check": "embed --decode auto on the test folder (tiny SigLIP2, bf16)", "pooled_cosine_min": float(cosine.min())})
    assert cosine.min() > 0.99 and not auto_embeddings[~ok].any()


def test_nvjpeg_pixels_against_pillow(files):
    """nvJPEG's decode against Pillow's (libjpeg-turbo) on the same files, turned upright: reported."""
    _needs_nvjpeg()
    device = torch.device("cuda")
    differences, sizes = [], 0
    for start in range(0, len(files), 64):
        batch = files[start: start + 64]
        data = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in batch]
        decoded = nvjpeg_decode(data, device)
        for path, file, image in zip(batch, data, decoded):
            header = read_header(file.numpy().tobytes(), None)
            with Image.open(path) as opened:
                expected = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
            ours = upright(image, header.orientation).cpu()
            assert ours.shape == expected.shape, path
            differences.append((ours.int() - expected.int()).abs().flatten())
            sizes += ours.numel()
    levels = torch.cat(differences).float()
    figures = {"check": "nvJPEG vs Pillow pixels, files workload", "files": len(files),
               "max_levels": int(levels.max()), "mean_levels": float(levels.mean()),
               "differing": float((levels > 0).float().mean()), "over_2_levels": float((levels > 2).float().mean())}
    report(figures)
    assert figures["mean_levels"] < 3, "the same pictures, decoded by two decoders"


@torch.inference_mode()
def test_gpu_route_against_the_cpu_route_on_a_full_size_so400m(checkpoint_root, files, tmp_path):
    """Pooled cosine of the two routes (>= 0.9999 in float32, where only the route differs; bf16
    reported), the device path's pixels against the CPU path's, and the rates of both."""
    _needs_nvjpeg()
    from packvit.harness import get_adapter

    checkpoint = get_adapter("siglip2").cached_random_checkpoint(checkpoint_root, size="full")
    folder = Path(files[0]).parent
    figures = {"check": "embed --decode gpu vs cpu, files workload, SigLIP2 so400m (random)", "files": len(files)}
    for model_dtype in ("float32", "bfloat16"):
        runs = {}
        for decode in ("cpu", "gpu"):
            summary = embed(str(checkpoint), folder, tmp_path / f"{decode}-{model_dtype}", decode=decode,
                            model_dtype=model_dtype, max_num_patches=256, quiet=True, overwrite=True)
            runs[decode] = (summary, *read_output(tmp_path / f"{decode}-{model_dtype}"))
            figures[f"{decode}_{model_dtype}_items_per_s"] = summary.stats.items / summary.stats.wall_s
        (cpu, cpu_rows, cpu_embeddings), (gpu, gpu_rows, gpu_embeddings) = runs["cpu"], runs["gpu"]
        assert gpu_rows == cpu_rows and gpu.ok == len(files) and gpu.stats.gpu_decoded == len(files)
        cosine = _cosine(gpu_embeddings.astype(np.float32), cpu_embeddings.astype(np.float32))
        figures[f"pooled_cosine_{model_dtype}_min"] = float(cosine.min())
        figures[f"pooled_cosine_{model_dtype}_mean"] = float(cosine.mean())

    spec = ProcessorSpec(str(checkpoint), "siglip2", True, 256)
    processor = spec.build()
    encoder = load_encoder(describe_checkpoint(str(checkpoint)), processor, JpegDecoder(torch.device("cuda")),
                           device="cuda", dtype=torch.float32)
    levels = []
    for pack in make_loader(plan_inputs(str(folder)).tasks, spec, 32768, DecodeOptions(gpu=True), 2, torch.device("cuda")):
        batch = encoder.pack_batch(pack)  # the GPU route's patches, normalised to [-1, 1]
        paths = [row.image_path for row in pack.jpeg_rows]
        reference = processor(images=paths)  # the CPU route's
        assert torch.equal(batch.grid_thw, reference.grid_thw)
        levels.append(((batch.patches.cpu() - reference.patches) * 127.5).abs().round().flatten())
    levels = torch.cat(levels)
    figures.update({"patch_max_levels": int(levels.max()), "patch_mean_levels": float(levels.mean()),
                    "patch_differing": float((levels > 0).float().mean())})

    data = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in files]
    nvjpeg_decode(data[:64], torch.device("cuda"))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(data), 64):
        nvjpeg_decode(data[first: first + 64], torch.device("cuda"))
    torch.cuda.synchronize()
    figures["nvjpeg_files_per_s_batches_of_64"] = len(data) / (time.perf_counter() - start)
    report(figures)
    assert figures["pooled_cosine_float32_min"] >= 0.9999, figures
