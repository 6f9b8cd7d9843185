"""Evaluation of bigsid generators: images for a prompt set, sharded over ranks and resumable, then FID, CLIP
score, aesthetic score and reward models in the papers' conventions, and the toy runs' ground-truth metrics.

`bigsid eval` is the command; this package uses bigsid's public API and bigsid's training code never imports it.

    generate.py   prompt index -> seed -> image, written once and atomically, with a manifest
    prompts.py    prompt sets: a text file, webdataset shards, the run's sample prompts
    sources.py    a run, a checkpoint, an exported folder, or the teacher's multi-step sampler
    fid.py        clean-fid protocol FID and KID; cached reference statistics with their convention
    clip.py       CLIP score and the LAION aesthetic score (open_clip or transformers CLIP)
    rewards.py    ImageReward, PickScore, HPSv2, each skipped with a message when absent
    toy.py        the ground-truth metrics of runs whose teacher has an analytic truth
    report.py     metrics.json with every number's convention; the Markdown comparison table
    cli.py        `bigsid eval`
"""

from evaluation._torchvision import ensure_importable

ensure_importable()  # before anything imports transformers, which imports torchvision when it is installed
