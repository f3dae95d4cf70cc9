"""``prdit-fast evaluate``: 3D FID, MMD and MS-SSIM of sampled volumes against a real set,
written as a JSON + Markdown report (``prdit_fast.metrics``, spec section 10).

The report file belongs to one evaluation (``prdit_fast.run_claims.claim_output_file``): the
running job holds a lock tied to ``--out``, so a second job with the same ``--out`` is refused
before any work; the report records its ``identity`` (``report_identity``), and a report of
another identity is replaced only with ``--overwrite``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prdit_fast.errors import UsageError
from prdit_fast.run_claims import FileClaim, claim_output_file

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names (torch is imported when the work starts)
RANDOM_WEIGHTS = "random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, type=Path,
                        help="real volumes, read as training reads them: prdit-fast preprocess output (*.npy), "
                             "the official layout (<case>/processed.nii.gz) or .npz, values in [0, 1]")
    parser.add_argument("--fake", required=True, type=Path, help="generated volumes: prdit-fast sample output")
    parser.add_argument("--range-tolerance", type=float, default=None,
                        help="largest accepted difference of the sets' minima or maxima (default 0.1, the official "
                             "evaluation's)")
    parser.add_argument("--weights", default=None,
                        help="MedicalNet's resnet_50.pth; default: fetched once from the Hugging Face Hub "
                             "(TencentMedicalNet/MedicalNet-Resnet50, SHA-256 checked) and cached; 'random': a "
                             "seeded random network, to try the command (numbers comparable to no paper)")
    parser.add_argument("--size", type=int, default=None,
                        help="evaluated edge; real volumes are average-pooled to it (default: the generated edge)")
    parser.add_argument("--out", type=Path, default=Path("evaluation.json"),
                        help="report file (JSON); the Markdown report goes next to it as .md (default evaluation.json); "
                             "one job at a time per file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a report at --out made by an evaluation of other inputs or settings (the same "
                             "evaluation run again replaces its own report without it)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="volumes per feature-network call (default 8)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32",
                        help="feature network precision (default fp32, as the paper; bf16 is faster on GPUs)")
    parser.add_argument("--fid-method", choices=("sqrtm", "factors"), default="sqrtm",
                        help="sqrtm: scipy's matrix square root as the official code (minutes on a CPU); factors: "
                             "the same distance from QR factors (seconds)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for 95%% intervals (0: none)")
    parser.add_argument("--no-ms-ssim", action="store_true", help="skip the MS-SSIM diversity")
    parser.add_argument("--ms-ssim-pairs", type=int, default=None,
                        help="MS-SSIM on this many random pairs instead of all N (N - 1) / 2")
    parser.add_argument("--pairs-per-call", type=int, default=16, help="MS-SSIM pairs per device call (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the MS-SSIM pair subset")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="real-set feature cache (default $XDG_CACHE_HOME or ~/.cache, /prdit_fast/real_features)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the real-set cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("W-Score (spec section 10; with --reference)")
    group.add_argument("--reference", type=Path, default=None,
                       help="the reference model's samples (prdit-fast sample output; the paper: PRDiT-12L): adds the "
                            "W-Score W_fake / W_reference from a critic trained on --real vs both")
    group.add_argument("--wscore-seeds", type=int, nargs="+", default=[42],
                       help="one critic per seed, trained at once (default 42, the authors'; give several for the "
                            "spread over seeds)")
    group.add_argument("--wscore-epochs", type=int, default=20, help="critic epochs (default 20, the authors')")
    group.add_argument("--wscore-checkpoint", choices=("in_sample", "held_out"), default="in_sample",
                       help="kept epoch: in_sample (the authors': best training w) or held_out (best held-out W)")
    group.add_argument("--wscore-split", choices=("first", "shuffled"), default="first",
                       help="train on the first 60%% of the name-sorted files (the authors') or of a seeded shuffle")
    group.add_argument("--wscore-precision", choices=("fp32", "tf32", "bf16"), default="tf32",
                       help="critic convolutions (default tf32; bf16 autocasts the w branch, the gradient penalty "
                            "stays fp32)")


def _validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "pairs_per_call"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UsageError(f"--bootstrap must be 0 or >= 2, got {args.bootstrap}")
    if args.wscore_epochs < 1:
        raise UsageError(f"--wscore-epochs must be >= 1, got {args.wscore_epochs}")
    if len(set(args.wscore_seeds)) != len(args.wscore_seeds):
        raise UsageError(f"--wscore-seeds must be distinct, got {args.wscore_seeds}")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give the report's file name (e.g. {args.out / 'report.json'})")
    if args.out.suffix == ".md":
        raise UsageError(f"--out {args.out}: the Markdown report is written next to the JSON one as .md; give the "
                         f"JSON file's name (e.g. {args.out.with_suffix('.json')})")
    if args.ms_ssim_pairs is not None and args.ms_ssim_pairs < 1:
        raise UsageError(f"--ms-ssim-pairs must be >= 1, got {args.ms_ssim_pairs}")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be >= 1, got {args.size}")
    if args.range_tolerance is not None and not args.range_tolerance >= 0:
        raise UsageError(f"--range-tolerance must be >= 0, got {args.range_tolerance}")
    if args.weights not in (None, RANDOM_WEIGHTS) and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights} is not a file; leave --weights out to fetch resnet_50.pth from "
                         f"the Hugging Face Hub, or see the README, section Evaluation")


def _edges(args: argparse.Namespace):
    """The generated files, their HU window, the evaluated edge and the real set, each
    checked before any volume is scored: UsageError (exit 2) on a mismatch."""
    from prdit_fast.metrics.volume_sets import generated_volume_files, generated_window, real_dataset, real_edge
    from prdit_fast.volumes import load_volume

    fake_files = generated_volume_files(args.fake)
    hu_window = generated_window(args.fake)
    fake_edge = int(load_volume(fake_files[0]).shape[-1])
    size = args.size or fake_edge
    if size != fake_edge:
        raise UsageError(f"--size {size}: the generated volumes are {fake_edge}^3 and are scored at their own edge "
                         f"(only real volumes are pooled); leave --size out or pass --size {fake_edge}")
    real = real_dataset(args.real, size)
    stored = real_edge(real)
    if stored % size:
        raise UsageError(f"--real volumes are {stored}^3, which average-pooling cannot bring to the generated edge "
                         f"{size} ({size} must divide {stored})")
    return fake_files, hu_window, size, real


def _network(args: argparse.Namespace, device):
    """The feature network named by --weights (a file, 'random', or the Hub's cached file)."""
    from prdit_fast.metrics.medicalnet import fetch_medicalnet_weights, load_medicalnet, random_medicalnet

    if args.weights == RANDOM_WEIGHTS:
        return random_medicalnet(args.seed).to(device), RANDOM_WEIGHTS
    path = Path(args.weights) if args.weights is not None else fetch_medicalnet_weights()
    return load_medicalnet(path, map_location=device), str(path)


def report_identity(args: argparse.Namespace) -> dict:
    """What decides the report's numbers, recorded in it as ``identity``: the resolved input
    folders, the weights and every setting that changes a number. Not recorded: the device,
    batch sizes, cache and progress options, ``--size`` (it must equal the generated edge)
    and ``--range-tolerance`` (it decides only whether the sets are scored)."""
    def resolved(path):
        return None if path is None else str(Path(path).resolve())

    weights = args.weights if args.weights in (None, RANDOM_WEIGHTS) else resolved(args.weights)
    return {
        "real": resolved(args.real), "fake": resolved(args.fake), "reference": resolved(args.reference),
        "weights": "MedicalNet from the Hugging Face Hub" if weights is None else weights,
        "dtype": args.dtype, "fid_method": args.fid_method, "bootstrap": args.bootstrap, "seed": args.seed,
        "ms_ssim": False if args.no_ms_ssim else (args.ms_ssim_pairs or "all pairs"),
        "wscore": None if args.reference is None else {
            "seeds": args.wscore_seeds, "epochs": args.wscore_epochs, "checkpoint": args.wscore_checkpoint,
            "split": args.wscore_split, "precision": args.wscore_precision},
    }


def claim_report(args: argparse.Namespace) -> FileClaim:
    """Claim ``--out`` (and its ``.md``) for this evaluation: UsageError when another job
    holds it or, without ``--overwrite``, when it holds another evaluation's report."""
    from prdit_fast.metrics.evaluate import markdown_report_path

    return claim_output_file(args.out, report_identity(args), companions=(markdown_report_path(args.out),),
                             overwrite=args.overwrite)


def evaluate_folders(args: argparse.Namespace) -> dict:
    """Check the arguments, claim ``--out``, read both folders as the module docstring of
    ``prdit_fast.metrics.volume_sets`` says, evaluate, write the report; returns the result."""
    _validate(args)
    with claim_report(args) as claim:
        return _evaluate_claimed(args, claim.identity)


def _evaluate_claimed(args: argparse.Namespace, identity: dict) -> dict:
    """The evaluation itself, run while ``--out`` is claimed; ``identity`` goes into the report."""
    import torch
    from tqdm.auto import tqdm

    from prdit_fast.devices import resolve_device
    from prdit_fast.metrics import evaluate, write_report
    from prdit_fast.metrics.evaluate import RANGE_TOLERANCE, default_cache_dir
    from prdit_fast.metrics.volume_sets import batches, files_key, read_generated

    fake_files, hu_window, size, real = _edges(args)
    reference = None
    if args.reference is not None:  # checked before any work too
        from prdit_fast.metrics.volume_sets import generated_volume_files, generated_window

        from prdit_fast.metrics.wasserstein import check_split

        reference = generated_volume_files(args.reference, flag="--reference"), generated_window(args.reference)
        try:
            check_split(len(real), [len(fake_files), len(reference[0])])
        except ValueError as e:
            raise UsageError(f"--reference: {e}") from e
    device = resolve_device(args.device)
    net, weights_name = _network(args, device)  # a wrong file fails before any volume is read
    show = not args.no_progress

    def real_volumes():  # a generator: the bar starts when the volumes are read, not before
        for index in tqdm(range(len(real)), desc="real volumes", unit="vol", disable=not show):
            yield real[index][0].numpy()

    def fake_volumes():
        for path in tqdm(fake_files, desc="generated volumes", unit="vol", disable=not show):
            yield read_generated(path, hu_window, size)

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    real_key = None
    if cache_dir is not None:
        real_key = files_key(real.files, args.real, f"real-v1 pooled to {size}")
    result = evaluate(
        batches(real_volumes(), args.batch_size), batches(fake_volumes(), args.batch_size), net,
        batch_size=args.batch_size, device=device,
        dtype=getattr(torch, _DTYPES[args.dtype]), ms_ssim=not args.no_ms_ssim, ms_ssim_pairs=args.ms_ssim_pairs,
        pairs_per_call=args.pairs_per_call, bootstrap=args.bootstrap, seed=args.seed, cache_dir=cache_dir,
        real_key=real_key, progress=show, log=lambda m: print(m, file=sys.stderr), fid_method=args.fid_method,
        range_tolerance=RANGE_TOLERANCE if args.range_tolerance is None else args.range_tolerance,
        random_weights=weights_name == RANDOM_WEIGHTS,
    )
    result.update({"weights": weights_name, "real": str(args.real), "fake": str(args.fake),
                   "fake_units": "HU" if hu_window else "normalized", "fake_hu_window": hu_window,
                   "identity": identity})
    if reference is not None:
        result["wscore"] = _wscore(args, real, fake_files, hu_window, size, reference, device, show)
    json_path, md_path = write_report(result, args.out)
    if result.get("random_weights"):
        print(result["not_comparable"])
    print(f"3D FID x10^3 {result['fid_x1e3']:.3f}  MMD {result['mmd']:.4f}  "
          + (f"MS-SSIM {result['ms_ssim']:.4f}" if result["ms_ssim"] is not None else f"MS-SSIM n/a ({result['ms_ssim_note']})")
          + f"  ({result['n_real']} real, {result['n_fake']} generated at {result['size']}^3)")
    if "wscore" in result:
        w = result["wscore"]
        print(f"W-Score {w['ratio']:.3f} (W_fake {w['w_fake']:.4g} / W_reference {w['w_reference']:.4g}, "
              f"{len(w['seeds'])} seed(s))")
    print(f"report: {json_path} and {md_path}")
    return result


def _wscore(args, real, fake_files, hu_window, size, reference, device, show) -> dict:
    """The W-Score of --fake against --reference on --real: volumes read in name order on the
    model's [-1, 1] scale, then the authors' preprocessing (``wscore_transform``)."""
    from prdit_fast.metrics import wasserstein
    from prdit_fast.metrics.volume_sets import read_generated

    reference_files, reference_window = reference
    reference_edge = int(read_generated(reference_files[0], reference_window).shape[-1])

    def volumes(files, window, edge):
        return (read_generated(path, window, edge) for path in files)

    result = wasserstein.wscore(
        (real[i][0] for i in range(len(real))), volumes(fake_files, hu_window, size),
        volumes(reference_files, reference_window, reference_edge), seeds=args.wscore_seeds,
        epochs=args.wscore_epochs, checkpoint=args.wscore_checkpoint, split=args.wscore_split,
        precision=args.wscore_precision, bootstrap=args.bootstrap, bootstrap_seed=args.seed, device=device,
        progress=show,
    )
    result["reference"] = str(args.reference)
    return result


def run(args: argparse.Namespace) -> int:
    from prdit_fast.metrics import IntensityRangeError, MedicalNetError

    try:
        evaluate_folders(args)
    except MedicalNetError as e:
        raise UsageError(f"--weights: {e}") from e
    except IntensityRangeError as e:
        raise UsageError(f"--real / --fake: {e}") from e
    return 0
