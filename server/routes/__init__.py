"""Dedicated routes: requests naming an adapter answered by a merged model in its own engine.

``route.py`` holds one route (its spec, its memory estimate, its engine); ``router.py`` holds the table
the edges submit through (route or shared base), promotion and demotion. Imports the engine and the
merge library; the edges import this, not the reverse.
"""
