"""pwopsd: Position-Weighted On-Policy Self-Distillation (PW-OPSD) and its baselines OPSD, EOPD and REOPOLD.

Training (`pwopsd.train`, `pwopsd.trainer`, `pwopsd.losses`), adapter merge (`pwopsd.merge`) and evaluation on
MATH-500, AIME 2024/2025 and HMMT Feb 2025 (`pwopsd.evaluation`). Importing the package is cheap: torch, transformers
and TRL are imported by the modules that need them. See docs/architecture.md for the data flow.
"""

__version__ = "0.1.0"
