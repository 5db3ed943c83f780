"""Launch one training config anywhere: in-process, as a Ray job, as a Slurm batch
job, or as a KubeRay ``RayJob``.

Every target reads the same ``RunConfig``: resource requests come from it
(``resources``), and the remote entrypoint is always ``python -m rlpost.train`` with
the user's overrides plus the few a launcher has to pin (``command``). Entry point:
``python -m rlpost.launch <target> ...`` or the ``rlpost`` console script.
"""
