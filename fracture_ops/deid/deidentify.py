"""``fracture-ops deidentify``: folder mode (INPUT OUTPUT) or manifest mode (--manifest)."""

from __future__ import annotations

from fracture_ops import catalog, storage
from fracture_ops.deid.config import SECRET_ENV, DeidConfig
from fracture_ops.errors import ConfigError


def configure_parser(parser) -> None:
    """Arguments of ``fracture-ops deidentify``."""
    from fracture_ops import cli_common

    cli_common.add_common_args(parser)
    parser.add_argument("input", nargs="?", metavar="INPUT", help="folder mode: input folder")
    parser.add_argument("output", nargs="?", metavar="OUTPUT",
                        help="folder mode: output folder (empty or an earlier de-id output)")
    parser.add_argument("--manifest", metavar="URI", help="manifest mode: canonical manifest")
    parser.add_argument("--allow-dev-secret", action="store_true", default=None,
                        help=f"demos only: built-in secret when ${SECRET_ENV} is unset")
    parser.add_argument("--pixel-policy", choices=["default", "blank-unread", "all-text", "off"],
                        default=None,
                        help="burned-in text: default blanks text but laterality/projection "
                        "markers and holds a file for review when a letter-like region inside "
                        "the body reads as nothing; blank-unread blanks such regions instead; "
                        "all-text blanks every text region; off leaves pixels alone "
                        "(config: pixels.policy / pixels.enabled)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes across files (default: one per usable CPU, at most 8)")
    parser.epilog = ("Outputs: de-identified files, report.json, report.html, gallery.html (the "
                     "review gallery: every output with its blanked regions outlined, held and "
                     "quarantined files with their reasons), audit.jsonl. A file whose burned-in "
                     "text cannot be removed is quarantined (listed, never written); a file with "
                     "an unread letter-like region inside the body is held under held/ until "
                     "`fracture-ops deid review OUTPUT --approve ID` releases it. Other options: "
                     "--set pixels.keep_tokens=[L,R] --set pixels.verifiers=[] ...")


def run_cli(args) -> dict:
    """Run folder mode (INPUT OUTPUT) or manifest mode (--manifest or manifest_uri in config)."""
    from fracture_ops import cli_common

    pixels = None
    if args.pixel_policy:
        pixels = ({"enabled": False} if args.pixel_policy == "off"
                  else {"enabled": True, "policy": args.pixel_policy})
    cfg = cli_common.config_from_args(DeidConfig, args, manifest_uri=args.manifest,
                                      allow_dev_secret=args.allow_dev_secret,
                                      workers=args.workers, pixels=pixels)
    if args.input or args.output:
        if args.manifest:
            raise ConfigError("give either INPUT OUTPUT (folder mode) or --manifest, not both")
        if not (args.input and args.output):
            raise ConfigError("folder mode needs both INPUT and OUTPUT")
        from fracture_ops.deid.folder import deidentify_folder

        return deidentify_folder(args.input, args.output, cfg)
    if not cfg.manifest_uri:  # a manual chain: this run's finished validation (and its boxes)
        clean = cfg.run_input("deidentify")
        boxes = storage.join(clean.rsplit("/", 1)[0], catalog.CLEAN_BOXES.file)
        cfg = cfg.model_copy(update={"manifest_uri": clean, "boxes_uri": cfg.boxes_uri or (
            boxes if storage.exists(boxes) else "")})
    from fracture_ops.deid.manifest import deidentify_manifest_step

    return deidentify_manifest_step(cfg)
