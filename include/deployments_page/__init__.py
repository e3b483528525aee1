"""The Deployments page: a FastAPI app (:mod:`include.deployments_page.app`) and its static HTML."""
