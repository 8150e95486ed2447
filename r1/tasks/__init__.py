"""Tasks with generated problems and rule-based checkers, for SFT data, evaluation and rewards.

Each task module generates deterministic, picklable problems and checks completions without a
model (`r1.tasks.arithmetic`). Task modules do not train or sample; they only produce and judge text.
"""
