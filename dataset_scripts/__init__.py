"""Converters from raw public datasets to RecBole atomic files (``.inter``, ``.item``, ``.user``).

Run ``python -m dataset_scripts --help`` from the repository root; see README.md here.
"""
