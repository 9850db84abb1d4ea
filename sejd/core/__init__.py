"""The bottom layer: errors, files, memory checks, machine facts, optional extras, small helpers."""
