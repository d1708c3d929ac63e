"""Human-feedback collection: a labelling web app on a real database.

- :mod:`~moss_rlhf.feedback.store`: the SQLAlchemy schema and every read/write (SQLite file or PostgreSQL);
  ``import_candidates`` and ``create_project_from_models`` fill a project;
- :mod:`~moss_rlhf.feedback.app`: the FastAPI app (labelling and admin pages, JSON API);
- :mod:`~moss_rlhf.feedback.agreement`: Cohen's and Fleiss' kappa, Krippendorff's alpha, consensus and gold agreement;
- :mod:`~moss_rlhf.feedback.export`: preference pairs for the reward model, and a raw dump of all judgements;
- :mod:`~moss_rlhf.feedback.simulate`: simulated annotators for the demo world (same store functions, or HTTP);
- :mod:`~moss_rlhf.feedback.commands`: ``moss-rlhf feedback …``.

Nothing heavy is imported here.
"""
