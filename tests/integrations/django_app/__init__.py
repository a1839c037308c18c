"""A minimal Django project for the door tests: settings, urls, views."""
