"""``fracture-ops deidentify``: folder mode (INPUT OUTPUT) or manifest mode (--manifest)."""

from __future__ import annotations

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


def run_cli(args) -> dict:
    """Run folder mode (INPUT OUTPUT) or manifest mode (--manifest or manifest_uri in config)."""
    from fracture_ops import cli_common

    cfg = cli_common.config_from_args(DeidConfig, args, manifest_uri=args.manifest,
                                      allow_dev_secret=args.allow_dev_secret)
    if args.input or args.output:
        if args.manifest:
            raise ConfigError("give either INPUT OUTPUT (folder mode) or --manifest, not both")
        if not (args.input and args.output):
            raise ConfigError("folder mode needs both INPUT and OUTPUT")
        from fracture_ops.deid.folder import deidentify_folder

        return deidentify_folder(args.input, args.output, cfg)
    if cfg.manifest_uri:
        from fracture_ops.deid.manifest import deidentify_manifest_step

        return deidentify_manifest_step(cfg)
    raise ConfigError("nothing to do: give INPUT OUTPUT (folder mode) or --manifest URI")
