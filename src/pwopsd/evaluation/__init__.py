"""Evaluation: benchmark → prompt → generate → extract → grade → vote → metrics → result file → validate → summarize."""
