"""Baseline Triton Python models the serving benchmark compares with: PEFT servers a user would write by hand."""
