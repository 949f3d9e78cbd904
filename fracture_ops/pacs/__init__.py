"""The hospital connection: a PACS reached over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

``pacs-ingest`` pulls new radiograph studies straight into de-identification; identified
pixels and headers never reach the dataset store.
"""
