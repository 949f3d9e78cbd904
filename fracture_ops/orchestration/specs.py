"""Declarative step specs: one per pipeline step, the single source of both runners' commands.

A spec names the CLI arguments (after ``fracture-ops``) as Jinja templates over the Airflow task
context (``params`` from the trigger form, ``run_id``), plus what the step needs from the cluster
(CPU, memory, GPUs, image), its retry policy and timeout. The ``kubernetes`` runner passes the
rendered arguments to the pod; the ``local`` runner runs the identical command as a subprocess.
This module imports neither Airflow nor Kubernetes, so it is cheap to import at DAG parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fracture_ops import catalog as C
from fracture_ops.orchestration.params import RECIPE_FIELDS, profile_template

# the run folder of a DAG run; Airflow run ids carry ':' and '+', which we keep out of paths
RUN_KEY = "{{ run_id | replace(':', '-') | replace('+', '-') }}"
RUN = "{{ params.artifact_root }}/runs/" + RUN_KEY
COMMON = ["--artifact-root", "{{ params.artifact_root }}", "--run-id", RUN_KEY]
# the raw zone (identifying tables before de-identification): the trigger's raw_root, else the
# artifact root with "-raw" appended (fracture_ops.config.default_raw_root, same rule)
RAW_ROOT = "{{ params.raw_root or (params.artifact_root.rstrip('/') ~ '-raw') }}"
RAW = RAW_ROOT + "/runs/" + RUN_KEY
RAW_ARGS = ("--raw-root", RAW_ROOT)


def at(artifact: C.Artifact) -> str:
    """The templated URI of a catalog artifact in this run: its zone's run folder + its path."""
    return f"{RAW if artifact.zone == 'raw' else RUN}/{artifact.path}"


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step as both runners see it.

    Attributes:
        name: task id in the DAG and the step's folder name.
        args: CLI arguments after ``fracture-ops`` (Jinja templates).
        cpu, memory: Kubernetes requests and limits (limits equal requests: no step takes more
            than it asked for).
        ephemeral: local disk (``/tmp`` and logs) requested and limited, e.g. ``2Gi``.
        gpu: number of ``nvidia.com/gpu`` to request (0 = CPU pool).
        gpus_param: the trigger parameter that sets the GPU count instead (rendered when the
            pod is built; the step's arguments pass the same count as ``--nproc-per-node``).
        nodes_param: the trigger parameter of the node count: more than 1 runs the step as a
            Kubeflow Trainer ``TrainJob`` over that many nodes of ``gpus_param`` GPUs each
            (Kubernetes runner; :mod:`fracture_ops.orchestration.trainjob`).
        image: which image the pod runs: ``training`` (CUDA) or ``platform`` (CPU).
        retries: retries on infrastructure failures (bad-data exits are never retried).
        retry_delay_s: first retry delay; doubles each retry (exponential back-off).
        timeout_s: execution timeout of the task.
        outputs: files the step writes, relative to its run folder (dataset store or raw zone);
            every file another step's arguments name must be listed here (a test checks).
        reads: the steps whose outputs this step reads: the DAG's edges are drawn from these
            (:func:`~fracture_ops.orchestration.airflow_tasks.wire_by_data`), and every step
            that the arguments name must be listed (a test checks).
        inputs: values this step takes from another task's JSON summary, as
            ``(name, task, key)``: the DAG passes ``task``'s XCom ``key`` as an XComArg, and an
            argument that is exactly ``{{ inputs.<name> }}`` receives it (the pod's argument
            list holds the XComArg itself; the local runner renders it from ``inputs``).
        expand: ``(name, task, key)``: the DAG runs one task per element of the list ``key`` of
            ``task``'s summary (Airflow's dynamic task mapping), each receiving its element as
            the input ``name`` (``{{ inputs.<name> }}``); empty: one task.
        secrets: which credentials the step's pod gets (``s3``: the object store; ``mlflow``:
            tracking and registry as the pipeline identity, which cannot move ``champion``;
            ``promoter``: the promoter identity, the promotion step's alone; ``deid``: the
            de-identification key; ``pacs``: the PACS's DICOMweb endpoint and account, whose
            pods alone may reach the PACS). Least privilege: only the steps that use a credential mount
            it; steps that parse untrusted input (ingest, validate, deidentify) get no registry
            credentials.
    """

    name: str
    args: tuple[str, ...]
    cpu: str = "1"
    memory: str = "2Gi"
    ephemeral: str = "2Gi"
    gpu: int = 0
    gpus_param: str = ""
    nodes_param: str = ""
    image: str = "platform"
    retries: int = 2
    retry_delay_s: int = 30
    timeout_s: int = 3600
    outputs: tuple[str, ...] = field(default_factory=tuple)
    reads: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str, str], ...] = ()
    expand: tuple[str, str, str] | tuple[()] = ()
    secrets: tuple[str, ...] = ("s3",)


def input_ref(name: str) -> str:
    """The argument that receives the step input ``name`` (see :attr:`StepSpec.inputs`)."""
    return "{{ inputs." + name + " }}"


def _spec(name: str, *args: str, pos: tuple[str, ...] = (), **kw: Any) -> StepSpec:
    """A step: subcommand and options, the common options, then ``--`` and the positionals.

    Positionals come after ``--`` so that a value from the trigger form that starts with ``-``
    (``--config=/tmp/x.yaml``) is read as the positional it was meant to be, never as a flag;
    the step then refuses it.
    """
    tail = ("--", *pos) if pos else ()
    return StepSpec(name=name, args=tuple(args) + tuple(COMMON) + tail, **kw)


def bool_flag(field: str, value: str) -> str:
    """One argument that renders to a boolean field's own flag, ``--field`` or ``--no-field``,
    from a Jinja expression ``value`` (``{{ ... }}``) of its value."""
    flag = "--" + field.replace("_", "-")
    inner = value.strip()[2:-2].strip()
    return f"{{{{ '{flag}' if ({inner}) else '--no-{flag[2:]}' }}}}"


def recipe_args(field: str) -> tuple[str, ...]:
    """A recipe field as its own flag, valued by the profile (see ``profile_template``)."""
    from fracture_ops.orchestration.params import field_default_of

    if isinstance(field_default_of(field), bool):  # the stored form: no step module imported
        return (bool_flag(field, profile_template(field)),)
    return ("--" + field.replace("_", "-"), profile_template(field))


TRAINING_STEPS: dict[str, StepSpec] = {s.name: s for s in [
    # ingest and validate write identifying tables to the raw zone only; the dataset store gets
    # counts and reports that name rows by number
    # folder layout: patient ids from a file-name regex, the DICOM headers, or (said so) none
    _spec("ingest", "ingest", "--layout", "{{ params.layout }}",
          "--patient-regex", "{{ params.patient_regex or '' }}",
          bool_flag("one_image_per_patient", "{{ params.one_image_per_patient }}"), *RAW_ARGS,
          pos=("{{ params.source_uri }}",),
          outputs=C.outputs_of("ingest")),
    _spec("validate", "validate", "--boxes", at(C.INGEST_BOXES),
          "--max-bad-fraction", "{{ params.max_bad_fraction }}", *RAW_ARGS,
          pos=(at(C.input_of("validate")),), reads=("ingest",), outputs=C.outputs_of("validate")),
    # OCR of burned-in text runs one worker process per requested CPU (each ~300 MB of models)
    _spec("deidentify", "deidentify", "--manifest", at(C.input_of("deidentify")),
          "--set", "boxes_uri=" + at(C.CLEAN_BOXES), "--workers", "2", *RAW_ARGS,
          outputs=C.outputs_of("deidentify"),
          reads=("validate",),
          cpu="2", memory="4Gi", ephemeral="8Gi", secrets=("s3", "deid")),
    _spec("split", "split", "--seed", "{{ params.seed }}", pos=(at(C.input_of("split")),),
          outputs=C.outputs_of("split"), reads=("deidentify",)),
    # model-size fields through the trigger form's profile (params.resolve_profile); a small data
    # set is cross-validated, then refitted on every training patient (workflows/fit.py)
    _spec("train", "fit", "--nproc-per-node", "{{ params.gpus }}",
          "--cv-below-images", profile_template("cv_below_images"),
          "--backbone", profile_template("backbone"),
          "--image-size", profile_template("image_size"), "--epochs", profile_template("epochs"),
          "--batch-size", profile_template("batch_size"), "--lr", profile_template("lr"),
          "--pretrained-path", "{{ params.pretrained_path }}",
          # the fine-tuning recipe: the gpu profile's (the real-data bench's), cpu-quick the defaults
          *[arg for f in RECIPE_FIELDS for arg in recipe_args(f)],
          "--loss", "{{ params.loss }}", "--seed", "{{ params.seed }}",
          # the de-identified boxes (absent when the data set has none) for box supervision
          "--boxes-uri", at(C.DEID_BOXES),
          "--box-weight", "{{ params.box_weight }}", "--global-pool", "{{ params.global_pool }}",
          pos=(at(C.input_of("train")),),
          cpu="4", memory="16Gi", ephemeral="20Gi", gpu=1, image="training", timeout_s=6 * 3600,
          outputs=C.outputs_of("train"), reads=("split", "deidentify"),
          secrets=("s3", "mlflow"), gpus_param="gpus", nodes_param="nodes"),
    _spec("calibrate", "calibrate", "--predictions", f"{RUN}/train",
          outputs=C.outputs_of("calibrate"), reads=("train",)),
    _spec("tune_thresholds", "tune-thresholds", "--predictions", f"{RUN}/train",
          "--calibration", at(C.CALIBRATION),
          outputs=C.outputs_of("tune_thresholds"), reads=("train", "calibrate")),
    _spec("evaluate", "evaluate", "--predictions", f"{RUN}/train",
          "--calibration", at(C.CALIBRATION), "--thresholds", at(C.THRESHOLDS),
          outputs=C.outputs_of("evaluate"), reads=("train", "calibrate", "tune_thresholds")),
    _spec("cam", "cam", "--calibration", at(C.CALIBRATION), "--thresholds", at(C.THRESHOLDS),
          image="training", outputs=C.outputs_of("cam"),
          # its defaults: this run's train folder and the de-identified boxes
          reads=("train", "calibrate", "tune_thresholds", "deidentify")),
    # package, register and gate read this run's step folders by default (their configs)
    _spec("package", "package", image="training", outputs=C.outputs_of("package"),
          reads=("train", "calibrate", "tune_thresholds", "evaluate", "cam"), secrets=("s3", "mlflow")),
    _spec("register", "register", image="training", outputs=C.outputs_of("register"),
          reads=("package", "evaluate", "train"), secrets=("s3", "mlflow")),
    _spec("gate", "gate", image="training", outputs=C.outputs_of("gate"),
          reads=("register", "split", "train"), secrets=("s3", "gate")),
    _spec("detect_train", "detect", "train", "--split-uri", at(C.SPLIT),
          "--boxes-uri", at(C.DEID_BOXES), "--epochs", "{{ params.detect_epochs }}",
          cpu="4", memory="16Gi", ephemeral="20Gi", gpu=1, image="training", timeout_s=6 * 3600,
          outputs=C.outputs_of("detect_train"), reads=("split", "deidentify"),
          secrets=("s3", "mlflow")),
]}


def ordered(steps: dict[str, StepSpec]) -> list[str]:
    """The steps' names in an order that runs every step after the steps it reads (the DAG's
    order, from ``reads`` alone; ties keep the table's order)."""
    done: list[str] = []
    left = list(steps)
    while left:
        ready = next((n for n in left if all(r in done or r not in steps for r in steps[n].reads)),
                     None)
        if ready is None:
            raise ValueError(f"the steps' reads form a cycle among {left}")
        done.append(ready)
        left.remove(ready)
    return done


PROMOTION_STEPS: dict[str, StepSpec] = {s.name: s for s in [
    # the only step with the promoter identity (the one MLflow account that may move champion)
    _spec("promote", "registry", "promote", image="training", retries=3, timeout_s=900,
          secrets=("s3", "promoter")),
]}


INFERENCE_STEPS: dict[str, StepSpec] = {s.name: s for s in [
    _spec("reference", "reference", image="training", outputs=(),
          secrets=("s3", "mlflow", "deid")),
    # plan the day's batch with the version the reference was built for (its pinned
    # models:/<name>/<version>, an XComArg of the reference task; a promotion may land in
    # between): ids only, cut into shards; runs without a logical date plan today's partition
    _spec("infer_plan", "infer-plan", "--date", "{{ ds if ds is defined else '' }}",
          "--model-uri", input_ref("model_uri"), "--shards", "{{ params.shards }}",
          inputs=(("model_uri", "reference", "model_uri"),), reads=("reference",),
          pos=("{{ params.incoming_uri }}",), image="training", outputs=C.outputs_of("infer_plan"),
          secrets=("s3", "mlflow", "deid"), timeout_s=1800),
    # one mapped task per shard (the plan's "shards" list), each into its own run-folder shard
    _spec("infer", "infer-shard", "--plan", at(C.INFER_PLAN),
          "--shard", input_ref("shard"), expand=("shard", "infer_plan", "shards"),
          reads=("infer_plan",), pos=("{{ params.incoming_uri }}",), image="training",
          secrets=("s3", "mlflow", "deid"),
          cpu="2", memory="8Gi", ephemeral="8Gi", timeout_s=4 * 3600),
    # every shard's rows as the batch's one part of the date partition (atomic, rerun-safe)
    _spec("infer_merge", "infer-merge", "--plan", at(C.INFER_PLAN),
          reads=("infer_plan", "infer"), timeout_s=1800),
    # optional (trigger parameter pacs_results, off by default): the champion's results on the
    # PACS-ingested studies back to the PACS as DICOM SR + Grad-CAM secondary capture, under the
    # original studies (identified data inside the hospital; ledger in the raw zone)
    _spec("pacs_report", "pacs-report", "--dataset", "{{ params.pacs_dataset }}", *RAW_ARGS,
          image="training", cpu="2", memory="8Gi", ephemeral="8Gi", retries=3, retry_delay_s=120,
          timeout_s=4 * 3600, outputs=C.outputs_of("pacs_report"), secrets=("s3", "mlflow", "pacs")),
]}

PACS_STEPS: dict[str, StepSpec] = {s.name: s for s in [
    # new CR/DX studies from the PACS (DICOMweb), de-identified on arrival into
    # <artifact_root>/pacs/<dataset>/; the watermark is kept in the raw zone. Its pod alone
    # reaches the PACS (network policy on the pacs credential's label)
    _spec("pacs_ingest", "pacs-ingest", "--dataset", "{{ params.dataset }}",
          "--max-studies", "{{ params.max_studies }}", *RAW_ARGS,
          cpu="2", memory="4Gi", ephemeral="8Gi", retries=3, retry_delay_s=120, timeout_s=4 * 3600,
          outputs=C.outputs_of("pacs_ingest"), secrets=("s3", "deid", "pacs")),
]}

DRIFT_STEPS: dict[str, StepSpec] = {s.name: s for s in [
    # report on the day before the logical date: that partition is complete (inference for the
    # logical date may still be writing); without a logical date, the newest partition
    _spec("drift", "drift", "{{ '--date=' ~ macros.ds_add(ds, -1) if ds is defined else '--newest' }}",
          "--window-days", "{{ params.window_days }}",
          "--drift-share-threshold", "{{ params.drift_share_threshold }}", image="training", memory="4Gi",
          secrets=("s3", "mlflow")),
]}


def render_args(spec: StepSpec, context: dict[str, Any]) -> list[str]:
    """Render a spec's arguments against a task context (``params``, ``run_id``, ...).

    Uses the same Jinja semantics as Airflow's template rendering, so the local runner and the
    pod get identical commands.
    """
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return [env.from_string(a).render(**context) for a in spec.args]


def run_folder(params: dict[str, Any], run_id: str) -> str:
    """The run folder a DAG run writes to (same rule as the templates)."""
    return f"{params['artifact_root']}/runs/{run_id.replace(':', '-').replace('+', '-')}"
