"""Where are the teacher's tokens reliable? The paper's diagnostic as a tool (`python code/diagnose.py`).

`profile` measures teacher-student disagreement along student rollouts by relative position u; `viability` forces the
teacher's preferred tokens into student rollouts and checks whether the student still reaches the gold answer, scores
predictors of that by AUROC, and fits a position-weight schedule w(u) to the viability curve. `stats` holds the
statistics (AUROC, cluster bootstrap, binning, schedule fit), `core` the model and id plumbing, `cli` the commands.
"""
