"""Genomic variants: VCF files, checked against the VCF specification as they are read."""
