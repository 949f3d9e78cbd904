"""The privacy boundary: DICOM PS3.15 Annex E header profile, burned-in text scrubbing with OCR
and a verification read, folder and manifest modes, audit log and reports.

Modules: ``config`` (the step's config and secret), ``profile`` (the header action table),
``ocr`` (text engines behind one interface), ``pixels`` (the scrubbing core), ``scrub`` (engines
per process and the audit entry), ``dicom`` / ``images`` (one file of each kind), ``folder`` and
``manifest`` (the two modes), ``report`` (JSON, HTML, audit), ``step`` (the CLI).
"""
