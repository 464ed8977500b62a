"""Prediction on the test slides and on H&E-only slides.

``registry`` declares every method once (name, what it needs, the function that computes it;
standard library only, read when the workflow is parsed); ``methods`` holds the functions and
the context they read; ``baselines`` the numpy baselines (mean, HEST ridge, retrieval);
``embeddings`` the frozen encoders; ``zeroshot`` CoMTIP's zero-shot; ``writers`` the prediction
h5ad; ``slides`` virtual Visium for H&E-only slides.
"""
