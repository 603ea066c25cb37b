"""Linear algebra on anything with ``@``: eigenvalues, trace, diagonal, density, solves.

Nothing here knows about networks: every function takes a curvature operator
*or a plain symmetric tensor*.
"""
